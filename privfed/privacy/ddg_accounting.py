"""The distributed discrete Gaussian's accounting (Kairouz, Liu, Steinke, ICML 2021): the RDP of
one round in which ``devices`` surviving devices each add a discrete Gaussian share to their
rounded, clipped update (privacy/distributed_dg.py is the mechanism).

Numpy and scipy only, like rdp.py and rqm_accounting.py: privacy/events.py prices this event in
the accountant service, which starts without torch.

Proposition 14 with Theorem 1's tau for the sum of the survivors' noise, the sensitivities of
the rounded vector (Proposition 22's conditional rounding), Zhu and Wang's (2019) Theorem 5 for
Poisson sampling of devices. Where this differs from Google's reference implementation
(google-research/federated, ``distributed_dp/accounting_utils.py``): fractional RDP orders take
the value at the *next* integer order (RDP is non-decreasing in the order, so that is a bound);
the reference rounds them down, which is not a bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special


def rounded_l2_bound(norm: float, dim: int, beta: float) -> float:
    """The L2 norm a vector of norm ``norm`` (already scaled to the lattice) can have after
    conditional randomized rounding in ``dim`` coordinates: ``norm + sqrt(dim)`` always, and with
    ``beta`` > 0 the tighter sqrt(norm^2 + dim / 4 + sqrt(2 log(1/beta)) (norm + sqrt(dim) / 2))
    that rounding is redrawn until it meets (Kairouz et al. 2021, Theorem 1 / Proposition 22)."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    always = norm + math.sqrt(dim)
    if beta == 0:
        return always
    conditional = (
        norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    )
    return min(always, math.sqrt(conditional))


def tau(sigma_lattice: float, devices: int) -> float:
    """Theorem 1's tau: how far the sum of ``devices`` discrete Gaussians N_Z(0, s^2)
    (``sigma_lattice`` = s, in lattice units) is from one discrete Gaussian of variance
    devices * s^2: 10 * sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))."""
    k = np.arange(1, devices, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * sigma_lattice**2 * k / (k + 1)).sum())


def _subsampled(alpha: int, q: float, eps: np.ndarray) -> float:
    """Zhu and Wang (2019), Theorem 5: RDP at integer order ``alpha`` >= 2 of a mechanism with
    RDP curve ``eps`` (eps[l] at order l, l = 2..alpha) run on a Poisson sample of rate q."""
    if q == 1.0:
        return float(eps[alpha])
    log_q, log_1q = math.log(q), math.log1p(-q)
    a = [0.0, float(eps[2])]
    b = [
        (1 - q) ** (alpha - 1) * (alpha * q - q + 1),
        special.comb(alpha, 2) * q**2 * (1 - q) ** (alpha - 2),
    ]
    if alpha >= 3:
        ls = np.arange(3, alpha + 1)
        log_comb = (
            special.gammaln(alpha + 1) - special.gammaln(ls + 1) - special.gammaln(alpha - ls + 1)
        )
        a += list((ls - 1) * eps[3 : alpha + 1] + log_comb + (alpha - ls) * log_1q + ls * log_q)
        b += [3.0] * len(ls)
    return float(special.logsumexp(a=a, b=b)) / (alpha - 1)


def ddg_rdp(
    q: float,
    clip: float,
    gamma: float,
    sigma: float,
    devices: int,
    dim: int,
    beta: float,
    orders: Sequence[float],
) -> np.ndarray:
    """RDP of one round of the distributed discrete Gaussian at each order: devices sampled at
    rate ``q``, each clipping to ``clip`` and adding N_Z(0, (sigma / gamma)^2) on the lattice of
    spacing ``gamma``, ``devices`` of them guaranteed to survive, ``dim`` coordinates.

    Proposition 14 with Theorem 1's tau, the sensitivities those of the rounded vector
    (:func:`rounded_l2_bound`; L1 <= L2 min(sqrt(dim), L2) for integer vectors), then Zhu and
    Wang's bound for the sampling where it is smaller. Fractional orders take the value at the
    next integer order (an upper bound: RDP is non-decreasing in the order).
    """
    if devices < 1:
        raise ValueError(f"ddg_rdp: at least one surviving device, got {devices}")
    s = sigma / gamma
    l2 = rounded_l2_bound(clip / gamma, dim, beta)
    l1 = l2 * min(math.sqrt(dim), l2)
    total = math.sqrt(devices) * s
    t = tau(s, devices)
    a2, a1 = l2 / total, l1 / total

    top = int(math.ceil(max(orders)))
    alpha = np.arange(top + 1, dtype=np.float64)
    plain = np.minimum.reduce(
        [
            alpha / 2 * a2**2 + t * dim,
            alpha / 2 * (a2**2 + 2 * a1 * t + t**2 * dim),
            alpha / 2 * (a2 + math.sqrt(dim) * t) ** 2,
        ]
    )
    out = []
    for order in orders:
        if order <= 1:
            raise ValueError(f"ddg_rdp: orders must exceed 1, got {order}")
        at = max(2, int(math.ceil(order)))
        out.append(min(float(plain[at]), _subsampled(at, q, plain)))
    return np.asarray(out, dtype=np.float64)
