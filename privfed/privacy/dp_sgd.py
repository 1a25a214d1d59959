"""Local training with Opacus DP-SGD (and the same loop without DP for ``privacy=none``).

Mechanism (record-level DP of one client's local dataset, add/remove neighbours):
each of ``steps`` steps samples a logical batch by Poisson sampling with rate ``q`` (Opacus
``DPDataLoader``), clips each example's gradient of the *trainable adapter tensors* to L2 norm
``C`` (``flat``) or each tensor's slice to ``C_l`` with ``sum C_l^2 = C^2`` (``per_layer``), sums,
adds N(0, (sigma C)^2) per coordinate and divides by the expected batch size. ``BatchMemoryManager``
splits logical batches into physical ones without changing the mechanism. The release is charged
as ``SampledGaussianEvent(q, sigma, steps)``.

All randomness of a round (sampling, noise, dropout) is seeded by (run seed, client, round) for
reproducibility. Privacy does not rest on that: a re-run of a released round re-sends the stored
release (releases.py), since float reductions need not repeat bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import get_optimizer_class
from opacus.utils.batch_memory_manager import BatchMemoryManager

from privfed.audit.canaries import CanaryGradients, canary_ids, is_canary
from privfed.config import PrivacyConfig, TrainConfig
from privfed.data.datasets import TokenizedSplit
from privfed.models.backbone import forward_logits
from privfed.privacy.events import SampledGaussianEvent


@dataclass(frozen=True)
class LocalPlan:
    """Sampling rate and step count of one client's round (known to the server in advance)."""

    q: float
    steps: int


def local_plan(num_examples: int, train: TrainConfig) -> LocalPlan:
    q = min(1.0, train.batch_size / num_examples)
    return LocalPlan(q=q, steps=max(1, round(train.local_epochs / q)))


def per_layer_bounds(shapes: list[torch.Size], privacy: PrivacyConfig) -> list[float]:
    """C_l per trainable tensor with sum C_l^2 = C^2 (so the noise std sigma*C is unchanged)."""
    assert privacy.max_grad_norm is not None
    total = privacy.max_grad_norm
    if privacy.per_layer_split == "equal":
        return [total / math.sqrt(len(shapes))] * len(shapes)
    sizes = [math.prod(s) for s in shapes]
    return [total * math.sqrt(n / sum(sizes)) for n in sizes]


@dataclass(frozen=True)
class LocalResult:
    num_examples: int
    steps: int
    mean_loss: float
    event: SampledGaussianEvent | None  # what this round spent (None without DP)


def round_seed(seed: int, client: int, server_round: int) -> int:
    """A distinct, reproducible seed per (run, client, round)."""
    return (seed * 1_000_003 + client * 10_007 + server_round) % (2**62)


def round_learning_rate(train: TrainConfig, server_round: int, num_rounds: int) -> float:
    """The learning rate of a round: constant, or a cosine decay from ``learning_rate`` to 10%
    of it over the run (the steps late in a noisy run should be small; post-processing, so no
    privacy cost)."""
    if train.lr_schedule == "constant" or num_rounds <= 1:
        return train.learning_rate
    progress = (server_round - 1) / (num_rounds - 1)
    return train.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(
    params: list[torch.nn.Parameter], train: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def train_local(*args, seed: int, **kwargs) -> LocalResult:
    """Run one round of local training in place on ``model``'s trainable parameters
    (see :func:`_train_local`); the global RNG (dropout) is seeded too, and restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return _train_local(*args, seed=seed, **kwargs)


def _train_local(
    model: torch.nn.Module,
    data: TokenizedSplit,
    train: TrainConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float | None,
    seed: int,
    device: str = "cpu",
    learning_rate: float | None = None,
    canaries: CanaryGradients | None = None,
    break_mechanism: str = "none",
) -> LocalResult:
    """``canaries``: an audit's gradient canaries, rows of ``data`` with negative labels whose
    per-sample gradients it supplies. ``break_mechanism`` (audit only): no_noise or no_clipping,
    while the returned event still claims the intact mechanism, to check that the audit sees it."""
    plan = local_plan(len(data), train)
    g_sample = torch.Generator().manual_seed(seed)
    g_noise = torch.Generator(device=device).manual_seed(seed + 1)
    loader = DPDataLoader(data.tensor_dataset(), sample_rate=plan.q, generator=g_sample)
    loader.batch_sampler.steps = plan.steps  # type: ignore[union-attr]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the strategy left no trainable tensor")
    optimizer = _optimizer(params, train, learning_rate or train.learning_rate)
    criterion = torch.nn.CrossEntropyLoss()
    model.to(device)
    model.train()  # from_pretrained() returns eval mode; Opacus needs train mode
    losses: list[float] = []

    if privacy.enabled:
        assert noise_multiplier is not None and privacy.max_grad_norm is not None
        mode = privacy.grad_sample_mode
        ghost = {"max_grad_norm": privacy.max_grad_norm} if mode == "ghost" else {}
        # Ghost clipping clips inside the module: without its own bound it silently clips to
        # Opacus' default of 1 while the noise is calibrated to C (caught by the canary test).
        dp_model = wrap_model(
            model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **ghost
        )
        max_norm: float | list[float] = privacy.max_grad_norm
        if privacy.clipping == "per_layer":
            max_norm = per_layer_bounds([p.shape for p in params], privacy)
        noise_used = noise_multiplier
        if break_mechanism == "no_noise":
            noise_used = 0.0
        elif break_mechanism == "no_clipping":  # bounds 10^6 x larger, noise std unchanged
            max_norm = [b * 1e6 for b in max_norm] if isinstance(max_norm, list) else max_norm * 1e6
            noise_used = noise_multiplier / 1e6
        optim_cls = get_optimizer_class(privacy.clipping, distributed=False, grad_sample_mode=mode)
        dp_optimizer = optim_cls(
            optimizer,
            noise_multiplier=noise_used,
            max_grad_norm=max_norm,
            expected_batch_size=max(1, round(plan.q * len(data))),
            loss_reduction="mean",
            generator=g_noise,
        )
        if mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            criterion = DPLossFastGradientClipping(dp_model, dp_optimizer, criterion, "mean")
        try:
            with BatchMemoryManager(
                data_loader=loader,
                max_physical_batch_size=train.physical_batch_size,
                optimizer=dp_optimizer,
            ) as physical:
                for input_ids, mask, labels in physical:
                    dp_optimizer.zero_grad(set_to_none=True)
                    sampled_canaries = None
                    canary = is_canary(labels) if canaries is not None else None
                    if canary is not None and bool(canary.any()):
                        sampled_canaries = canary_ids(labels[canary])
                        real = ~canary
                        input_ids, mask, labels = input_ids[real], mask[real], labels[real]
                    input_ids, mask, labels = (
                        input_ids.to(device),
                        mask.to(device),
                        labels.to(device),
                    )
                    if len(labels) or sampled_canaries is None:
                        loss = criterion(forward_logits(dp_model, input_ids, mask), labels)
                        loss.backward()
                        if len(labels):
                            losses.append(float(loss.detach()))
                    if sampled_canaries is not None:
                        canaries.add_to_grad_samples(sampled_canaries)
                    dp_optimizer.step()  # noise is added only at the end of a logical batch
        finally:
            if hasattr(dp_model, "_close"):
                dp_model._close()  # remove hooks and per-sample buffers
        event = SampledGaussianEvent(q=plan.q, sigma=noise_multiplier, steps=plan.steps)
    else:
        for input_ids, mask, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            n = len(labels)
            for start in range(0, n, train.physical_batch_size):
                sl = slice(start, start + train.physical_batch_size)
                logits = forward_logits(model, input_ids[sl].to(device), mask[sl].to(device))
                loss = criterion(logits, labels[sl].to(device)) * (len(labels[sl]) / n)
                loss.backward()
                losses.append(float(loss.detach()) * n / len(labels[sl]))
            if n:
                optimizer.step()
        event = None

    return LocalResult(
        num_examples=len(data),
        steps=plan.steps,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        event=event,
    )
