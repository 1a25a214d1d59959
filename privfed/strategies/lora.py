"""Baseline: LoRA with FedAvg of A and B (McMahan et al. 2017; Hu et al. 2021).

Clients train A (random init) and B (zero init); the server averages each factor:
``A <- sum_k w_k A_k``, ``B <- sum_k w_k B_k``. Not exact: ``(sum w B)(sum w A) != sum w B A``;
:func:`aggregation_error` reports the relative Frobenius error of the product per round
(docs/algorithms.md), the reason the other strategies exist.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from privfed.strategies.base import AdapterStrategy, Supports
from privfed.tensors import State, weighted_mean


def lora_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every LoRA-adapted module among ``names``."""
    pairs = []
    for name in names:
        if ".lora_A." in name:
            b = name.replace(".lora_A.", ".lora_B.")
            if b in names:
                pairs.append((name, b))
    return sorted(pairs)


def fedavg(payloads: list[State], weights: list[float]) -> State:
    """Weighted mean of every tensor, name by name."""
    return {n: weighted_mean([p[n] for p in payloads], weights) for n in payloads[0]}


def aggregation_error(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: list[float]
) -> tuple[float, float]:
    """(||sum w B_k A_k - (sum w B_k)(sum w A_k)||_F^2, ||sum w B_k A_k||_F^2), weights
    normalised, sums in float64.

    The error is sum w_k (B_k - B)(A_k - A) for the means A, B: one product of the stacked,
    centred factors, never n full-size products (at 1,000 clients those were the server's
    largest cost). Centred, it needs no cancellation between two large products, so that one
    product runs in float32 (2.5x faster) with float32's precision relative to the error itself
    (the factors are centred in float64: clients that agree give zero to float64 rounding)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to > 0")
    w = torch.tensor(weights, dtype=torch.float64) / total
    a = torch.stack(a_list).double()  # (n, r, d)
    b = torch.stack(b_list, dim=1).double()  # (d, n, r): the B_k side by side, no copy later
    a_mean, b_mean = torch.einsum("n,nrd->rd", w, a), torch.einsum("n,dnr->dr", w, b)
    n, r, d = a.shape
    stacked_b = ((b - b_mean[:, None, :]) * w[None, :, None]).float().reshape(d, n * r)
    stacked_a = (a - a_mean).float().reshape(n * r, d)
    error = (stacked_b @ stacked_a).double()
    exact = error + b_mean @ a_mean
    return float(error.pow(2).sum()), float(exact.pow(2).sum())


def relative_aggregation_error(
    factors: list[tuple[list[torch.Tensor], list[torch.Tensor]]], weights: list[float]
) -> float:
    """``aggregation_error`` over all adapted modules: each item is one module's clients'
    (A list, B list); the result is sqrt(sum of squared errors / sum of squared products)."""
    num = den = 0.0
    for a_list, b_list in factors:
        n, d = aggregation_error(a_list, b_list, weights)
        num, den = num + n, den + d
    return (num / den) ** 0.5 if den > 0 else 0.0


class LoraFedAvg(AdapterStrategy):
    """``strategy=lora``: FedAvg of every adapter tensor (A, B and the head)."""

    name = "lora"
    supports: ClassVar[Supports] = Supports(
        head_alone=True, prototype_head=True, noise_policy_base=True
    )

    def aggregate(self, global_state: State, payloads: list[State], weights: list[float]) -> State:
        return {**global_state, **fedavg(payloads, weights)}

    def round_metrics(
        self, global_state: State, payloads: list[State], weights: list[float]
    ) -> dict[str, float]:
        factors = [
            ([p[a] for p in payloads], [p[b] for p in payloads])
            for a, b in lora_pairs(list(payloads[0]))
        ]
        return {"aggregation_error": relative_aggregation_error(factors, weights)}
