"""Clipped sums of per-example gradients over a client's whole local dataset.

Two one-shot releases use them instead of DP-SGD's sampled steps:

* Fed-SB's DP initialisation: each example's gradient of the target weights is clipped to L2
  norm ``C`` and the sum gets N(0, (sigma C)^2) noise per coordinate, drawn from a fresh secret
  stream (privfed/randomness.py): one Gaussian mechanism (``GaussianEvent(sigma)``; add/remove
  one example changes the sum by at most ``C``);
* RQM's privacy mode: each coordinate of each example's gradient is clipped to ``[-c, c]``
  (an L-infinity bound), the sum is divided by the (public) example count and then quantized by
  RQM with secret randomness, which is where the privacy comes from.

Per-example gradients come from Opacus' ``GradSampleModule`` (hooks), checked against
per-example autograd in the tests.
"""

from __future__ import annotations

from typing import Literal

import torch
from opacus import GradSampleModule

from privfed.data.datasets import TokenizedSplit
from privfed.data.features import FeatureSplit
from privfed.models.backbone import forward_inputs
from privfed.privacy.invariants import required
from privfed.randomness import RandomStream


def clipped_gradient_sum(
    model: torch.nn.Module,
    data: TokenizedSplit | FeatureSplit,
    names: list[str],
    clip: Literal["l2", "linf", "none"],
    bound: float | None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Sum over all examples of each example's gradient of ``names`` (the model's only trainable
    parameters), clipped per example: ``l2`` to norm ``bound`` over all tensors together,
    ``linf`` coordinate-wise to ``[-bound, bound]``, ``none`` not at all."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in names)
    model.to(device)
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    sums = {n: torch.zeros_like(params[n], device=device) for n in names}
    labels = data.labels
    try:
        for start in range(0, len(labels), batch_size):
            sl = slice(start, start + batch_size)
            gsm.zero_grad(set_to_none=True)
            for n in names:
                params[n].grad_sample = None  # type: ignore[attr-defined]  # set by Opacus
            inputs = tuple(x.to(device) for x in data.inputs(sl))
            loss = criterion(forward_inputs(gsm, inputs), labels[sl].to(device))
            loss.backward()
            # (b, *shape) each: Opacus' per-sample gradients
            per_example = {n: params[n].grad_sample for n in names}  # type: ignore[attr-defined]
            if clip == "l2":
                bound = required(bound, "the clipping bound")
                norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_example.values()))
                factor = (bound / (norms + 1e-6)).clamp(max=1.0)
                for n, g in per_example.items():
                    sums[n] += torch.einsum("b,b...->...", factor, g)
            elif clip == "linf":
                bound = required(bound, "the clipping bound")
                for n, g in per_example.items():
                    sums[n] += g.clamp(-bound, bound).sum(0)
            else:
                for n, g in per_example.items():
                    sums[n] += g.sum(0)
    finally:
        gsm._close()
        for name in names:
            params[name].grad_sample = None  # type: ignore[attr-defined]  # set by Opacus
    return {n: t.detach().cpu() for n, t in sums.items()}


def gaussian_noise_like(
    tensors: dict[str, torch.Tensor], std: float, stream: RandomStream
) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) per coordinate, one tensor per name, drawn in sorted name order
    from ``stream`` (a fresh secret one for a release)."""
    return {n: stream.normal(tensors[n].shape, std, tensors[n].dtype) for n in sorted(tensors)}
