"""Randomized Quantization Mechanism (RQM): "Randomized Quantization is All You Need for
Differential Privacy in Federated Learning" (Youn et al. 2023), as docs/algorithms.md states it.

This module runs the mechanism (:func:`quantize`) and packs what a client uploads (the level
index, ``ceil(log2 m)`` bits); its exact output distribution and RDP curve live in
privacy/rqm_accounting.py, which the accountant service imports without torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from privfed.privacy.rqm_accounting import bits_per_index, levels
from privfed.randomness import RandomStream


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
