"""RDP curves of the Gaussian mechanisms, in numpy and scipy only.

The accountant service prices every report with these, so this module must not pull in the
training stack: importing Opacus imports torch (seconds of start-up, hundreds of MB), and a
restarted service has to answer its clients within their retry window. The formulas are the
ones Opacus and dp-accounting implement, written for a whole order set at once; the tests check
them against both to 1e-10 relative.

Sampled Gaussian (Mironov, Talwar, Zhang 2019, Sec. 3.3): for an integer order alpha,

    A_alpha = sum_{i=0}^{alpha} C(alpha, i) (1 - q)^(alpha - i) q^i exp((i^2 - i) / (2 sigma^2))

and RDP(alpha) = log(A_alpha) / (alpha - 1), summed in log space. A fractional order has no
finite sum: A_alpha is split at z0 = sigma^2 log(1/q - 1) + 1/2 into two series of erfc-weighted
terms (Mironov et al. 2019, Sec. 3.3), summed until both decrease and the newest is e^-30 of the
total (dp-accounting's rule, so that the two agree to rounding; Opacus 1.6 stops on an absolute
e^-30 instead, which differs where A_alpha itself is small).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.special import gammaln, log_ndtr


@lru_cache(maxsize=8)
def _binomial_terms(orders: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """For every order alpha and every i in 2..alpha, flattened: alpha, i, log C(alpha, i), and
    where each order's run of terms starts."""
    ints = [int(a) for a in orders]
    if any(a != i or i < 2 for a, i in zip(orders, ints, strict=True)):
        raise ValueError(f"sampled Gaussian RDP: integer orders >= 2 only, got {orders}")
    alpha = np.concatenate([np.full(a - 1, a, dtype=np.float64) for a in ints])
    i = np.concatenate([np.arange(2, a + 1, dtype=np.float64) for a in ints])
    log_binom = gammaln(alpha + 1) - gammaln(i + 1) - gammaln(alpha - i + 1)
    counts = np.asarray([a - 1 for a in ints])
    return alpha, i, log_binom, np.cumsum(counts) - counts, counts


def sampled_gaussian_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian mechanism (rate ``q``, noise
    multiplier ``sigma``) at each of ``orders`` (> 1; integer ones exactly, fractional ones by
    :func:`_fractional_log_a`)."""
    a = np.asarray(orders, dtype=np.float64)
    if q >= 1.0:
        return gaussian_rdp(sigma, orders)
    integer = a == np.floor(a)
    out = np.empty(len(a))
    if integer.any():
        out[integer] = _integer_rdp(q, sigma, tuple(float(x) for x in a[integer]))
    if not integer.all():
        fractional = a[~integer]
        value = _fractional_log_a(q, sigma, fractional) / (fractional - 1.0)
        # RDP is >= 0 and non-decreasing in alpha: the exact integer order above bounds a
        # fractional one, which also caps the series' rounding where the values are tiny.
        ceiling = np.maximum(np.ceil(fractional), 2.0)
        unique = tuple(float(x) for x in np.unique(ceiling))
        upper = dict(zip(unique, _integer_rdp(q, sigma, unique), strict=True))
        cap = np.asarray([upper[float(x)] for x in ceiling])
        out[~integer] = np.where(np.isinf(value), value, np.clip(value, 0.0, cap))
    return out


def _integer_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """Sampled Gaussian RDP at integer orders >= 2.

    Computed as log1p(A_alpha - 1): the binomial weights sum to 1, so
    A_alpha - 1 = sum_{i>=2} C(alpha, i) (1-q)^(alpha-i) q^i expm1((i^2 - i) / (2 sigma^2)),
    a sum of positive terms. Summing A_alpha itself (as Opacus and dp-accounting do) loses
    everything below 1e-16 to cancellation, so small curves came out as 0 or as rounding noise.
    """
    a = np.asarray(orders, dtype=np.float64)
    alpha, i, log_binom, starts, counts = _binomial_terms(tuple(orders))
    c = (i * i - i) / (2.0 * sigma * sigma)  # > 0 for i >= 2
    with np.errstate(divide="ignore"):  # np.where evaluates both branches everywhere
        small = np.log(np.expm1(np.minimum(c, 30.0)))
        large = c + np.log1p(-np.exp(-np.maximum(c, 30.0)))
    log_expm1 = np.where(c < 30.0, small, large)
    terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + log_expm1
    peak = np.maximum.reduceat(terms, starts)
    log_a_minus_1 = peak + np.log(np.add.reduceat(np.exp(terms - np.repeat(peak, counts)), starts))
    return np.logaddexp(0.0, log_a_minus_1) / (a - 1.0)


_FRACTIONAL_TERMS = 1000  # dp-accounting's cap; an order that has not converged by then is inf


def _fractional_log_a(q: float, sigma: float, alpha: np.ndarray) -> np.ndarray:
    """log A_alpha for fractional orders (0 < q < 1), all orders at once: terms i = 0, 1, ...
    in blocks, each order summed up to the first i where dp-accounting's series would stop."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma * sigma * math.log(1.0 / q - 1.0) + 0.5
    root2_sigma = math.sqrt(2.0) * sigma
    out = np.full(len(alpha), np.inf)
    pending = np.arange(len(alpha))  # orders whose series has not stopped yet
    width = 64
    while True:
        i = np.arange(width, dtype=np.float64)[None, :]
        a = alpha[pending, None]
        j = a - i
        log_coef = gammaln(a + 1) - gammaln(i + 1) - gammaln(j + 1)  # log |C(alpha, i)|
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / root2_sigma)
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / root2_sigma)
        s0 = log_coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2) + log_e0
        s1 = log_coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2) + log_e1
        total = np.logaddexp(
            np.logaddexp.accumulate(s0, axis=1), np.logaddexp.accumulate(s1, axis=1)
        )
        stop = np.zeros_like(s0, dtype=bool)
        stop[:, 1:] = (
            (s0[:, 1:] < s0[:, :-1])
            & (s1[:, 1:] < s1[:, :-1])
            & (np.maximum(s0[:, 1:], s1[:, 1:]) < total[:, 1:] - 30)
        )
        done = stop.any(axis=1)
        first = stop.argmax(axis=1)
        out[pending[done]] = total[done, first[done]]
        pending = pending[~done]
        if not len(pending) or width >= _FRACTIONAL_TERMS:
            return out
        width = min(4 * width, _FRACTIONAL_TERMS)


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log erfc(x), accurate far into the tail."""
    return math.log(2.0) + log_ndtr(-x * math.sqrt(2.0))


def gaussian_rdp(sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of the Gaussian mechanism with noise multiplier ``sigma``: alpha / (2 sigma^2)."""
    return np.asarray(orders, dtype=np.float64) / (2.0 * sigma * sigma)
