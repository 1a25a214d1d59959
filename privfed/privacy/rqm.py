"""Randomized Quantization Mechanism (RQM): "Randomized Quantization is All You Need for
Differential Privacy in Federated Learning" (Youn et al. 2023), as ALGORITHMS.md states it.

One coordinate ``x``, clipped to ``[-c, c]``; parameters ``delta > 0`` (range extension), ``m``
levels, ``q`` in (0, 1] (keep probability of the interior levels):

1. levels ``b_j = -(c + delta) + j * 2 (c + delta) / (m - 1)``, ``j = 0 .. m-1``;
2. keep ``b_0`` and ``b_{m-1}`` always and every other level independently with probability q;
3. with ``l`` the largest kept level ``<= x`` and ``u`` the smallest kept level ``>= x``, output
   ``u`` with probability ``(x - l) / (u - l)``, else ``l`` (unbiased: ``E[out] = x``).

The message is the level index (``ceil(log2 m)`` bits). The output distribution is computed
exactly (:func:`output_distribution`, O(m^2) per x), so the Renyi divergence between the outputs
at two inputs is exact too; :func:`rdp_per_coordinate` takes its maximum over a grid of pairs
``|x - x'| <= sensitivity`` (both orders) at every accountant order. An L-infinity bound lets one
record change all ``dims`` coordinates, so a release costs ``dims`` times that curve.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from scipy.special import logsumexp

from privfed.randomness import RandomStream


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
        for z in range(a, m):
            table[a, z] = table[a, z - 1] * drop[z] if z > a else drop[a]
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
    gap = b[None, :] - b[:, None]  # gap[i, j] = b_j - b_i
    with np.errstate(divide="ignore", invalid="ignore"):
        w_up = np.where(gap > 0, (x[:, None, None] - b[None, :, None]) / gap[None], 0.0)
    joint = p_low[:, :, None] * p_up[:, None, :]  # (N, i, j)
    out = (joint * (1.0 - w_up)).sum(axis=2) + (joint * w_up).sum(axis=1)
    stay = np.where(on_level, keep[np.clip(k_lo, 0, m - 1)], 0.0)
    out = out * (1.0 - stay)[:, None]
    out[np.arange(len(x)), np.clip(k_lo, 0, m - 1)] += stay
    return out


def quantize(
    x: torch.Tensor, c: float, delta: float, m: int, q: float, stream: RandomStream
) -> torch.Tensor:
    """Run the mechanism on every coordinate of ``x``: level indices (int64, same shape).
    ``stream`` supplies the level sampling and the rounding; its draws are what the guarantee
    rests on, so a release draws from a fresh secret one (privfed/randomness.py)."""
    flat = x.detach().to(torch.float64).flatten().clamp(-c, c)
    b = torch.as_tensor(levels(c, delta, m), dtype=torch.float64)
    out = torch.empty(flat.numel(), dtype=torch.int64)
    idx = torch.arange(m)
    for start in range(0, flat.numel(), 65536):  # bounded memory: chunks of (65536, m)
        xs = flat[start : start + 65536]
        kept = stream.uniform((len(xs), m)) < q
        kept[:, 0] = kept[:, -1] = True
        lower = torch.where(kept & (b[None] <= xs[:, None]), idx, -1).max(dim=1).values
        upper = torch.where(kept & (b[None] >= xs[:, None]), idx, m).min(dim=1).values
        b_l, b_u = b[lower], b[upper]
        p_up = torch.where(upper > lower, (xs - b_l) / (b_u - b_l).clamp_min(1e-300), 0.0)
        go_up = stream.uniform(len(xs)) < p_up
        out[start : start + len(xs)] = torch.where(go_up, upper, lower)
    return out.reshape(x.shape)


def dequantize(indices: torch.Tensor, c: float, delta: float, m: int) -> torch.Tensor:
    b = torch.as_tensor(levels(c, delta, m), dtype=torch.float32)
    return b[indices.long()]


def pack_indices(indices: torch.Tensor, m: int) -> torch.Tensor:
    """Level indices (any shape, values < m <= 256) as ``ceil(log2 m)`` bits each, packed into
    a flat uint8 tensor: what a client uploads."""
    bits = bits_per_index(m)
    flat = indices.flatten().to(torch.uint8).numpy()
    bit_matrix = np.unpackbits(flat[:, None], axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(bit_matrix.flatten()).copy())


def unpack_indices(packed: torch.Tensor, m: int, numel: int) -> torch.Tensor:
    bits = bits_per_index(m)
    flat = np.unpackbits(packed.numpy().astype(np.uint8))[: numel * bits].reshape(numel, bits)
    padded = np.concatenate([np.zeros((numel, 8 - bits), dtype=np.uint8), flat], axis=1)
    return torch.from_numpy(np.packbits(padded, axis=1)[:, 0].astype(np.int64))


def packed_size(numel: int, m: int) -> int:
    return math.ceil(numel * bits_per_index(m) / 8)


def renyi_divergence(p: np.ndarray, r: np.ndarray, alpha: float) -> np.ndarray:
    """D_alpha(p || r) row by row (float64, in log space; inf where supports differ)."""
    with np.errstate(divide="ignore"):
        lp, lr = np.log(p), np.log(r)
    terms = alpha * lp + (1.0 - alpha) * lr
    terms = np.where(p > 0, terms, -np.inf)
    return logsumexp(terms, axis=-1) / (alpha - 1.0)


def divergence_pairs(
    c: float, delta: float, m: int, sensitivity: float, points: int = 400, offsets: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """The input pairs the RDP maximum runs over: x on a grid of ``points`` values over
    [-c, c] plus every level inside it (where the output distribution bends), and for each x the
    values ``x + k * sensitivity / offsets``, k = -offsets .. offsets, kept in [-c, c]."""
    b = levels(c, delta, m)
    xs = np.concatenate([np.linspace(-c, c, points), b[(b > -c) & (b < c)]])
    shifts = sensitivity * np.arange(-offsets, offsets + 1) / offsets
    return xs, np.clip(xs[:, None] + shifts[None, :], -c, c)


@lru_cache(maxsize=256)
def rdp_per_coordinate(
    c: float,
    delta: float,
    m: int,
    q: float,
    sensitivity: float,
    orders: tuple[float, ...],
) -> np.ndarray:
    """max over pairs |x - x'| <= sensitivity (both orders of the pair) of D_alpha(P_x || P_x'),
    for every order alpha."""
    xs, x_prime = divergence_pairs(c, delta, m, sensitivity)
    p = output_distribution(xs, c, delta, m, q)  # (G, m)
    r = output_distribution(x_prime.flatten(), c, delta, m, q).reshape(*x_prime.shape, m)
    p = np.broadcast_to(p[:, None, :], r.shape)
    curve = [
        max(float(np.max(renyi_divergence(p, r, a))), float(np.max(renyi_divergence(r, p, a))))
        for a in orders
    ]
    return np.asarray(curve)
