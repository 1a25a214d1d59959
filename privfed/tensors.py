"""Named tensor sets, the one type that adapter states, replies' payloads and updates share, and
the weighted mean every aggregation over them starts from."""

from __future__ import annotations

import torch

# A named tensor set: a model's adapter state ({"...lora_A.default.weight": tensor, ...}), a
# client's payload, a device's update. Every module that passes one uses this alias.
State = dict[str, torch.Tensor]


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_k w_k x_k with weights normalised to sum to 1 (computed in float64)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to > 0")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        acc += t.to(torch.float64) * (w / total)
    return acc.to(tensors[0].dtype)
