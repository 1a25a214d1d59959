"""RDP curves of the Gaussian mechanisms, in numpy and scipy only.

The accountant service prices every report with these, so this module must not pull in the
training stack: importing Opacus imports torch (seconds of start-up, hundreds of MB), and a
restarted service has to answer its clients within their retry window. The formulas are the
ones Opacus and dp-accounting implement, written for a whole order set at once; the tests check
them against both to 1e-10 relative.

Sampled Gaussian (Mironov, Talwar, Zhang 2019, Sec. 3.3): for an integer order alpha,

    A_alpha = sum_{i=0}^{alpha} C(alpha, i) (1 - q)^(alpha - i) q^i exp((i^2 - i) / (2 sigma^2))

and RDP(alpha) = log(A_alpha) / (alpha - 1), summed in log space.
Fractional orders need the erfc series; they come with the dp-accounting order set.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.special import gammaln


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
    multiplier ``sigma``) at each of ``orders`` (integers >= 2).

    Computed as log1p(A_alpha - 1): the binomial weights sum to 1, so
    A_alpha - 1 = sum_{i>=2} C(alpha, i) (1-q)^(alpha-i) q^i expm1((i^2 - i) / (2 sigma^2)),
    a sum of positive terms. Summing A_alpha itself (as Opacus and dp-accounting do) loses
    everything below 1e-16 to cancellation, so small curves came out as 0 or as rounding noise.
    """
    a = np.asarray(orders, dtype=np.float64)
    if q >= 1.0:
        return gaussian_rdp(sigma, orders)
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


def gaussian_rdp(sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of the Gaussian mechanism with noise multiplier ``sigma``: alpha / (2 sigma^2)."""
    return np.asarray(orders, dtype=np.float64) / (2.0 * sigma * sigma)
