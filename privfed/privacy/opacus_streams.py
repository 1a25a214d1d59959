"""Opacus' Poisson sampler and DP optimizers, drawing from a :class:`RandomStream`.

Opacus draws its sampling masks and its noise from a ``torch.Generator``; its ``secure_mode``
needs ``torchcsprng``, which is not built for current torch releases. These subclasses change
only where the draws come from (privfed/randomness.py: a fresh secret stream per release under
DP) and keep everything else Opacus does: per-example clipping (flat, per-layer, ghost), the
noise std ``sigma * C`` per coordinate, the scaling by the expected batch size, and
``BatchMemoryManager``'s logical batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache

import torch
from opacus.data_loader import wrap_collate_with_empty
from opacus.optimizers import get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data._utils.collate import default_collate

from privfed.randomness import RandomStream

ReleaseObserver = Callable[[list[torch.Tensor]], None]


class StreamPoissonSampler(UniformWithReplacementSampler):
    """``steps`` logical batches; each example is in each batch independently with probability
    ``sample_rate`` (Opacus' sampler, its masks drawn from ``stream``). A batch may be empty."""

    def __init__(
        self, *, num_samples: int, sample_rate: float, steps: int, stream: RandomStream
    ) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)
        self.stream = stream

    def __iter__(self):
        for _ in range(self.steps):
            mask = self.stream.bernoulli(self.num_samples, self.sample_rate)
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def poisson_loader(
    dataset: TensorDataset, sample_rate: float, steps: int, stream: RandomStream
) -> DataLoader:
    """A data loader of Poisson-sampled logical batches (empty ones collate to empty tensors)."""
    first = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=StreamPoissonSampler(
            num_samples=len(dataset), sample_rate=sample_rate, steps=steps, stream=stream
        ),
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate,
            sample_empty_shapes=[(0, *x.shape) for x in first],
            dtypes=[x.dtype for x in first],
        ),
    )


def step_noise(
    stream: RandomStream,
    shapes: Sequence[Sequence[int]],
    std: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """One DP-SGD step's noise, N(0, std^2) per coordinate, one tensor per trainable parameter
    in order (zeros, drawing nothing, when ``std`` is 0, as Opacus does). The white-box auditor
    calls this too, to regenerate what a config-derived stream would have drawn.

    Drawn in one piece and cut into the parameters' shapes: one pass over the stream instead of
    one per tensor (a MiniLM + LoRA step has 26), which costs less per coordinate."""
    if std == 0:
        return [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
    sizes = [math.prod(s) for s in shapes]
    flat = stream.normal((sum(sizes),), std, dtype, device)
    return [part.view(s) for part, s in zip(flat.split(sizes), shapes, strict=True)]


class _StreamNoise:
    """Mixin for an Opacus DP optimizer: noise from ``noise_stream``; ``on_release`` (if set)
    sees each step's release, the clipped sum plus noise, before it is scaled and applied."""

    noise_stream: RandomStream
    on_release: ReleaseObserver | None = None

    def add_noise(self) -> None:
        params = self.params  # type: ignore[attr-defined]
        # Opacus' fast gradient clipping optimizer may carry an adjusted multiplier; the
        # others have none (the same rule as their own add_noise).
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)  # type: ignore[attr-defined]
        std = sigma * self.max_grad_norm  # type: ignore[attr-defined]
        for p in params:
            _check_processed_flag(p.summed_grad)
        ref = params[0].summed_grad
        noises = step_noise(
            self.noise_stream, [p.summed_grad.shape for p in params], std, ref.dtype, ref.device
        )
        for p, noise in zip(params, noises, strict=True):
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)
        if self.on_release is not None:
            self.on_release([p.grad for p in params])


@cache
def _with_stream_noise(base: type) -> type:
    return type(f"Stream{base.__name__}", (_StreamNoise, base), {})


def dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    clipping: str,
    grad_sample_mode: str,
    noise_multiplier: float,
    max_grad_norm: float | list[float],
    expected_batch_size: int,
    noise_stream: RandomStream,
    on_release: ReleaseObserver | None = None,
):
    """Opacus' DP optimizer for (clipping, grad_sample_mode), with its noise from
    ``noise_stream``."""
    base = get_optimizer_class(clipping, distributed=False, grad_sample_mode=grad_sample_mode)
    dp = _with_stream_noise(base)(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    dp.noise_stream = noise_stream
    dp.on_release = on_release
    return dp
