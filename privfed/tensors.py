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


def flatten(update: State) -> torch.Tensor:
    """The update as one float64 vector, tensors in name order (:func:`unflatten` reads it back)."""
    return torch.cat([update[n].detach().double().flatten() for n in sorted(update)])


def unflatten(vector: torch.Tensor, like: State) -> State:
    """:func:`flatten`'s vector as tensors named and shaped as ``like``'s."""
    out, at = {}, 0
    for name in sorted(like):
        n = like[name].numel()
        out[name] = vector[at : at + n].reshape(like[name].shape)
        at += n
    if at != vector.numel():
        raise ValueError(f"unflatten: {vector.numel()} numbers for {at} coordinates")
    return out
