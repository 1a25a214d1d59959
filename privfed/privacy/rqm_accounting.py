"""RQM's exact output distribution and its RDP curve, in numpy and scipy only (the accountant
service prices RQM events with this module and must not import torch; privacy/rqm.py runs the
mechanism itself).

One coordinate ``x``, clipped to ``[-c, c]``; parameters ``delta > 0`` (range extension), ``m``
levels, ``q`` in (0, 1] (keep probability of the interior levels):

1. levels ``b_j = -(c + delta) + j * 2 (c + delta) / (m - 1)``, ``j = 0 .. m-1``;
2. keep ``b_0`` and ``b_{m-1}`` always and every other level independently with probability q;
3. with ``l`` the largest kept level ``<= x`` and ``u`` the smallest kept level ``>= x``, output
   ``u`` with probability ``(x - l) / (u - l)``, else ``l`` (unbiased: ``E[out] = x``).

:func:`output_distribution` computes P[out = b_j | x] exactly; :func:`rdp_per_coordinate` takes
the maximum Renyi divergence over a fixed grid of input pairs ``|x - x'| <= sensitivity`` (both
orders) at every accountant order.

What one curve costs is bounded by construction, because the accountant service computes curves
for whatever a client reports: the pair grid is fixed (:data:`GRID_POINTS` inputs plus the
levels, :data:`GRID_OFFSETS` shifts each way), the levels are capped at
:data:`MAX_ACCOUNTED_LEVELS`, and the work is O(grid x m^2) in BLAS with O(grid x m) memory.
The mechanism is scale-free (c, delta and the sensitivity only matter as ratios), so curves are
computed and cached for c = 1.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

GRID_POINTS = 400  # inputs x on [-c, c], besides the levels inside it
GRID_OFFSETS = 8  # x' = x + k * sensitivity / GRID_OFFSETS, k = -8 .. 8
# An exact curve at 64 levels takes about 1.4 s here (16 levels: 0.3 s), in the accountant
# service's pricing worker; 256 would take ~16x longer for a mechanism that, at that many
# levels, rounds so finely that it protects almost nothing.
MAX_ACCOUNTED_LEVELS = 64
# delta / c outside this range makes the levels either coincide with the clipping range to
# float64 precision or dwarf it; neither is a configuration anyone means.
RANGE_EXTENSION_RATIO = (1e-6, 1e6)


def levels(c: float, delta: float, m: int) -> np.ndarray:
    return -(c + delta) + np.arange(m) * (2.0 * (c + delta) / (m - 1))


def bits_per_index(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _keep(m: int, q: float) -> np.ndarray:
    keep = np.full(m, float(q))
    keep[0] = keep[-1] = 1.0
    return keep


def output_distribution(x: np.ndarray, c: float, delta: float, m: int, q: float) -> np.ndarray:
    """P[out = b_j | x] for every x (shape (N,)) and level j: an (N, m) array of exact
    probabilities (float64)."""
    x = np.clip(np.atleast_1d(np.asarray(x, dtype=np.float64)), -c, c)
    b = levels(c, delta, m)
    keep = _keep(m, q)
    drop = 1.0 - keep
    # T[a, z] = prod_{t=a}^{z} drop[t] (1 for an empty range a > z)
    table = np.ones((m + 1, m + 1))
    for a in range(m):
        table[a, a:m] = np.cumprod(drop[a:])
    k_lo = np.searchsorted(b, x, side="right") - 1
    k_hi = np.searchsorted(b, x, side="left")
    on_level = k_lo == k_hi
    # Strictly between two levels: lower candidates i <= lo, upper candidates j >= hi, independent.
    # On level k: with prob. keep[k] the output is k; otherwise lower i < k and upper j > k.
    lo = np.where(on_level, k_lo - 1, k_lo)
    hi = np.where(on_level, k_hi + 1, k_hi)
    idx = np.arange(m)[None, :]
    # P[lower = i] = keep[i] prod_{t=i+1}^{lo} drop[t];  P[upper = j] = keep[j] prod_{t=hi}^{j-1}.
    # (table's last row and column are ones: the empty products at the ends.)
    p_low = np.where(idx <= lo[:, None], keep * table[idx + 1, lo[:, None]], 0.0)
    p_up = np.where(idx >= hi[:, None], keep * table[hi[:, None], idx - 1], 0.0)
    # Given lower i and upper j, the output is j with probability (x - b_i) / (b_j - b_i). Both
    # sums over the other end are matrix products with inv_gap[i, j] = 1 / (b_j - b_i) (j > i;
    # wherever p_low[i] p_up[j] > 0, j > i holds).
    gap = b[None, :] - b[:, None]
    with np.errstate(divide="ignore"):
        inv_gap = np.where(gap > 0, 1.0 / np.where(gap > 0, gap, 1.0), 0.0)
    dx = x[:, None] - b[None, :]
    up = p_up * ((p_low * dx) @ inv_gap)
    down = p_low * (p_up.sum(axis=1, keepdims=True) - dx * (p_up @ inv_gap.T))
    out = up + down
    stay = np.where(on_level, keep[np.clip(k_lo, 0, m - 1)], 0.0)
    out = out * (1.0 - stay)[:, None]
    out[np.arange(len(x)), np.clip(k_lo, 0, m - 1)] += stay
    return out


def divergence_pairs(
    c: float, delta: float, m: int, sensitivity: float
) -> tuple[np.ndarray, np.ndarray]:
    """The input pairs the RDP maximum runs over: x on a grid of GRID_POINTS values over
    [-c, c] plus every level inside it (where the output distribution bends), and for each x the
    values ``x + k * sensitivity / GRID_OFFSETS``, k = -GRID_OFFSETS .. GRID_OFFSETS, kept in
    [-c, c]."""
    b = levels(c, delta, m)
    xs = np.concatenate([np.linspace(-c, c, GRID_POINTS), b[(b > -c) & (b < c)]])
    shifts = sensitivity * np.arange(-GRID_OFFSETS, GRID_OFFSETS + 1) / GRID_OFFSETS
    return xs, np.clip(xs[:, None] + shifts[None, :], -c, c)


def check_accountable(c: float, delta: float, m: int, q: float, sensitivity: float) -> None:
    """ValueError unless the accountant prices this RQM configuration (the bounds above)."""
    for name, value in (("c", c), ("delta", delta), ("sensitivity", sensitivity)):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(q, int | float) and math.isfinite(q) and 0 < q <= 1):
        raise ValueError(f"q must be in (0, 1], got {q!r}")
    if not (isinstance(m, int) and 2 <= m <= MAX_ACCOUNTED_LEVELS):
        raise ValueError(
            f"m must be an integer in [2, {MAX_ACCOUNTED_LEVELS}] (the accountant's limit on "
            f"levels it prices), got {m!r}"
        )
    low, high = RANGE_EXTENSION_RATIO
    if not low <= delta / c <= high:
        raise ValueError(f"delta / c must be in [{low:g}, {high:g}], got {delta / c:g}")


def rdp_per_coordinate(
    c: float,
    delta: float,
    m: int,
    q: float,
    sensitivity: float,
    orders: tuple[float, ...],
) -> np.ndarray:
    """max over pairs |x - x'| <= sensitivity (both orders of the pair) of D_alpha(P_x || P_x'),
    for every order alpha. Computed at c = 1 (the mechanism only sees ratios; a sensitivity over
    2c allows every pair, as 2c does), so trivially rescaled events share one cached curve."""
    check_accountable(c, delta, m, q, sensitivity)
    curve = _normalised_curve(delta / c, m, float(q), min(sensitivity / c, 2.0), tuple(orders))
    return curve.copy()


@lru_cache(maxsize=256)
def _normalised_curve(
    delta: float, m: int, q: float, sensitivity: float, orders: tuple[float, ...]
) -> np.ndarray:
    xs, x_prime = divergence_pairs(1.0, delta, m, sensitivity)
    p = output_distribution(xs, 1.0, delta, m, q)  # (G, m)
    r = output_distribution(x_prime.flatten(), 1.0, delta, m, q).reshape(*x_prime.shape, m)
    p = np.broadcast_to(p[:, None, :], r.shape).reshape(-1, m)
    r = r.reshape(-1, m)
    # D_alpha(P || R) = log sum_j p_j exp((alpha - 1) log(p_j / r_j)) / (alpha - 1): the logs and
    # their difference once, then one log-sum-exp per order and direction.
    with np.errstate(divide="ignore", invalid="ignore"):
        lp, lr = np.log(p), np.log(r)
        log_ratio = lp - lr  # +inf where r_j = 0 < p_j; nan where both are 0 (no mass: skipped)
    curve = []
    for a in orders:
        worst = 0.0
        for log_weight, ratio in ((lp, log_ratio), (lr, -log_ratio)):
            with np.errstate(invalid="ignore"):
                terms = log_weight + (a - 1.0) * ratio
            terms = np.where(np.isnan(terms), -np.inf, terms)
            peak = terms.max(axis=1)
            if (peak == np.inf).any():  # supports differ: unbounded
                worst = np.inf
                break
            finite = peak > -np.inf
            sums = np.log(np.exp(terms[finite] - peak[finite, None]).sum(axis=1)) + peak[finite]
            worst = max(worst, float(sums.max()) / (a - 1.0))
        curve.append(worst)
    return np.asarray(curve)
