"""Local training with Opacus DP-SGD (and the same loop without DP for ``privacy=none``).

Mechanism (record-level DP of one client's local dataset, add/remove neighbours):
each of ``steps`` steps samples a logical batch by Poisson sampling with rate ``q`` (Opacus'
sampler, privacy/opacus_streams.py), clips each example's gradient of the *trainable adapter
tensors* to L2 norm ``C`` (``flat``) or each tensor's slice to ``C_l`` with ``sum C_l^2 = C^2``
(``per_layer``), sums, adds N(0, (sigma C)^2) per coordinate and divides by the expected batch
size. ``BatchMemoryManager`` splits logical batches into physical ones without changing the
mechanism. The release is charged as ``SampledGaussianEvent(q, sigma, steps)``.

Randomness (privfed/randomness.py): under DP, the Poisson sampling masks and the Gaussian noise
come from fresh secret streams (a ChaCha20 key from the OS per stream, per release), and dropout
from a secret seed; nothing a server knows (the config, its seed, the run id, the client, the
round) determines them. Without DP every draw is seeded from (run seed, client, round): a
``privacy=none`` run repeats exactly. A re-run of a released round re-sends the stored release
(releases.py); it never draws again.

An empty Poisson batch is a step like any other: the sum of no clipped gradients is zero, the
release is the noise alone, and the step counts.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from opacus.grad_sample.utils import wrap_model
from opacus.utils.batch_memory_manager import BatchMemoryManager

from privfed.config import PrivacyConfig, TrainConfig
from privfed.data.datasets import TokenizedSplit
from privfed.data.features import FeatureSplit
from privfed.models.backbone import forward_inputs
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.invariants import required
from privfed.privacy.opacus_streams import ReleaseObserver, dp_optimizer, poisson_loader
from privfed.randomness import RandomStream, public_seed
from privfed.telemetry.client_profile import ComputeClock, NoClock


@dataclass(frozen=True)
class LocalPlan:
    """Sampling rate and step count of one client's round (known to the server in advance)."""

    q: float
    steps: int


def local_plan(num_examples: int, train: TrainConfig) -> LocalPlan:
    """q: Poisson sampling at batch_size / n, or 1 (full batch); steps: given, or as many as
    make ``local_epochs`` expected passes."""
    if train.sampling == "full_batch":
        q = 1.0
    else:
        q = min(1.0, train.batch_size / num_examples)
    steps = train.local_steps or max(1, round(train.local_epochs / q))
    return LocalPlan(q=q, steps=steps)


def per_layer_bounds(shapes: list[torch.Size], privacy: PrivacyConfig) -> list[float]:
    """C_l per trainable tensor with sum C_l^2 = C^2 (so the noise std sigma*C is unchanged)."""
    total = required(privacy.max_grad_norm, "privacy.max_grad_norm")
    if privacy.per_layer_split == "equal":
        return [total / math.sqrt(len(shapes))] * len(shapes)
    sizes = [math.prod(s) for s in shapes]
    return [total * math.sqrt(n / sum(sizes)) for n in sizes]


class PerSampleHooks(Protocol):
    """Where DP-SGD gets Opacus' per-sample gradient module for ``model``: by default wrapped
    for the round and closed after it; a worker's kept model keeps it (client/local_model.py)."""

    def hooks(self, mode: str, clip: float) -> torch.nn.Module: ...

    def release_hooks(self) -> None: ...


def per_sample_module(model: torch.nn.Module, mode: str, clip: float) -> AbstractGradSampleModule:
    """Opacus' module computing per-sample gradients of ``model``'s trainable tensors."""
    # Ghost clipping clips inside the module: without its own bound it silently clips to
    # Opacus' default of 1 while the noise is calibrated to C (caught by the canary test).
    ghost = {"max_grad_norm": clip} if mode == "ghost" else {}
    return wrap_model(
        model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **ghost
    )


class HooksForOneRound:
    """Opacus' hooks added for one round and removed after it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._module: AbstractGradSampleModule | None = None

    def hooks(self, mode: str, clip: float) -> torch.nn.Module:
        self._module = per_sample_module(self.model, mode, clip)
        return self._module

    def release_hooks(self) -> None:
        if self._module is not None:
            self._module._close()  # remove hooks and per-sample buffers
        self._module = None


@dataclass(frozen=True)
class LocalResult:
    num_examples: int
    steps: int
    mean_loss: float
    event: SampledGaussianEvent | None  # what this round spent (None without DP)


@dataclass(frozen=True)
class RoundRandomness:
    """Where one client round's draws come from: Poisson sampling, Gaussian noise, dropout."""

    sampling: RandomStream
    noise: RandomStream
    dropout_seed: int

    @classmethod
    def secret(cls) -> RoundRandomness:
        """Fresh, secret draws for one release (every DP round)."""
        return cls(
            RandomStream.secret("dp_sgd.sampling"),
            RandomStream.secret("dp_sgd.noise"),
            secrets.randbits(63),
        )

    @classmethod
    def public(cls, seed: int, client: int, server_round: int) -> RoundRandomness:
        """Reproducible draws from the run seed (``privacy=none``: nothing to protect)."""
        return cls(
            RandomStream.public(seed, "dp_sgd.sampling", client, server_round),
            config_derived_noise(seed, client, server_round),
            public_seed(seed, "dp_sgd.dropout", client, server_round),
        )


def config_derived_noise(seed: int, client: int, server_round: int) -> RandomStream:
    """The noise stream anyone with the run's config can re-create for (client, round). A DP
    round never draws from it, except under the audit's ``known_noise`` fault (audit/faults.py),
    which exists to show that the white-box auditor catches exactly that mistake."""
    return RandomStream.public(seed, "dp_sgd.noise", client, server_round)


def round_randomness(private: bool, seed: int, client: int, server_round: int) -> RoundRandomness:
    """Secret draws under DP, seeded ones without."""
    if not private:
        return RoundRandomness.public(seed, client, server_round)
    return RoundRandomness.secret()


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
    # foreach: one kernel per operation over all tensors, not a loop (torch picks it only on
    # CUDA); the same arithmetic, 1.2 -> 1.0 ms an Adam step over LoRA's 26 tensors on CPU
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, foreach=True)
    return torch.optim.SGD(params, lr=lr, foreach=True)


class SuppliedGradients(Protocol):
    """Rows of a batch whose per-sample gradients are supplied rather than computed (an
    audit's gradient canaries, audit/canaries.py): DP-SGD takes them out of the forward pass
    and lets their supplier add their gradients, which the optimizer then clips and noises with
    the others. Poisson-sampled like every record; nothing else about them is DP-SGD's business.
    """

    def supplied(self, labels: torch.Tensor) -> torch.Tensor | None:
        """A mask of this physical batch's supplied rows (None: there are none)."""
        ...

    def supply(self, labels: torch.Tensor) -> None:
        """Add the per-sample gradients of the supplied rows with these labels."""
        ...


def train_local(
    model: torch.nn.Module,
    data: TokenizedSplit | FeatureSplit,
    train: TrainConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float | None,
    randomness: RoundRandomness,
    device: str = "cpu",
    learning_rate: float | None = None,
    supplied: SuppliedGradients | None = None,
    on_release: ReleaseObserver | None = None,
    fault: Callable[[float, float | list[float]], tuple[float, float | list[float]]] | None = None,
    per_sample: PerSampleHooks | None = None,
    clock: ComputeClock | None = None,
) -> LocalResult:
    """One round of local training, in place on ``model``'s trainable parameters.

    ``randomness``: the round's draws (:func:`round_randomness`). ``supplied``: rows of
    ``data`` whose per-sample gradients someone else supplies (an audit's canaries);
    ``on_release`` sees each DP step's release (clipped sum + noise), the auditor's
    view. ``fault`` (an audit's, audit/faults.py): maps (noise multiplier, bounds) to what is
    really used, while the returned event still claims the intact mechanism. ``per_sample``:
    where Opacus' per-sample gradient module comes from (default: made for this round);
    ``clock``: times the forward and backward passes (benchmarks).
    """
    timed = clock or NoClock()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(randomness.dropout_seed)  # dropout: the global generator
        plan = local_plan(len(data), train)
        loader = poisson_loader(data.tensor_dataset(), plan.q, plan.steps, randomness.sampling)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the strategy left no trainable tensor")
        optimizer = _optimizer(params, train, learning_rate or train.learning_rate)
        if params[0].device != torch.device(device):  # a worker's kept model moved once
            model.to(device)
        # from_pretrained() returns eval mode; Opacus needs train mode. A worker's kept model is
        # in it already: looking costs a fifth of setting it (1 ms on MiniLM, 249 modules)
        if not all(m.training for m in model.modules()):
            model.train()
        if not privacy.enabled:
            losses = _train_non_private(model, loader, optimizer, train, device, timed)
            event = None
        else:
            noise_multiplier = required(noise_multiplier, "the noise multiplier")
            losses = _train_dp_sgd(
                model,
                loader,
                optimizer,
                params,
                train,
                privacy,
                noise_multiplier,
                max(1, round(plan.q * len(data))),
                randomness.noise,
                device,
                supplied,
                on_release,
                fault,
                per_sample or HooksForOneRound(model),
                timed,
            )
            event = SampledGaussianEvent(q=plan.q, sigma=noise_multiplier, steps=plan.steps)
    return LocalResult(
        num_examples=len(data),
        steps=plan.steps,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        event=event,
    )


def _train_dp_sgd(
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    train: TrainConfig,
    privacy: PrivacyConfig,
    noise_multiplier: float,
    expected_batch_size: int,
    noise: RandomStream,
    device: str,
    supplied: SuppliedGradients | None,
    on_release: ReleaseObserver | None,
    fault: Callable[[float, float | list[float]], tuple[float, float | list[float]]] | None,
    per_sample: PerSampleHooks,
    timed: ComputeClock | NoClock,
) -> list[float]:
    """Opacus DP-SGD over the loader's Poisson batches (logical batches split into physical
    ones); returns the losses of the non-empty physical batches (they never leave a client)."""
    clip = required(privacy.max_grad_norm, "privacy.max_grad_norm")
    mode = privacy.grad_sample_mode
    dp_model = per_sample.hooks(mode, clip)
    max_norm: float | list[float] = clip
    if privacy.clipping == "per_layer":
        max_norm = per_layer_bounds([p.shape for p in params], privacy)
    noise_used = noise_multiplier
    if fault is not None:  # an audit breaking the mechanism on purpose
        noise_used, max_norm = fault(noise_multiplier, max_norm)
    dp_optimizer_ = dp_optimizer(
        optimizer,
        clipping=privacy.clipping,
        grad_sample_mode=mode,
        noise_multiplier=noise_used,
        max_grad_norm=max_norm,
        expected_batch_size=expected_batch_size,
        noise_stream=noise,
        on_release=on_release,
    )
    criterion: torch.nn.Module = torch.nn.CrossEntropyLoss()
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        criterion = DPLossFastGradientClipping(dp_model, dp_optimizer_, criterion, "mean")
    losses: list[float] = []
    try:
        with BatchMemoryManager(
            data_loader=loader,
            max_physical_batch_size=train.physical_batch_size,
            optimizer=dp_optimizer_,
        ) as physical:
            for *inputs, labels in physical:
                dp_optimizer_.zero_grad(set_to_none=True)
                mask = supplied.supplied(labels) if supplied is not None else None
                if mask is not None:  # never forwarded: their gradients are supplied
                    taken = labels[mask]
                    inputs, labels = [x[~mask] for x in inputs], labels[~mask]
                if len(labels):
                    with timed:
                        logits = forward_inputs(dp_model, tuple(x.to(device) for x in inputs))
                        loss = criterion(logits, labels.to(device))
                        loss.backward()
                    losses.append(float(loss.detach()))
                else:  # no real example in this batch: nothing to forward
                    _no_examples(params, ghost=mode == "ghost")
                if supplied is not None and mask is not None:
                    supplied.supply(taken)
                dp_optimizer_.step()  # noise is added only at the end of a logical batch
    finally:
        per_sample.release_hooks()
    return losses


def _no_examples(params: list[torch.nn.Parameter], ghost: bool) -> None:
    """An empty batch's (zero) contribution in the form Opacus' optimizers read: per-sample
    gradients of zero rows, or (ghost clipping, which clips in the backward pass) a zero
    gradient. The optimizer then clips nothing and releases the noise alone."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]  # set by Opacus


def _train_non_private(
    model: torch.nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    device: str,
    timed: ComputeClock | NoClock,
) -> list[float]:
    criterion = torch.nn.CrossEntropyLoss()
    losses: list[float] = []
    for *inputs, labels in loader:
        optimizer.zero_grad(set_to_none=True)
        n = len(labels)
        for start in range(0, n, train.physical_batch_size):
            sl = slice(start, start + train.physical_batch_size)
            with timed:
                logits = forward_inputs(model, tuple(x[sl].to(device) for x in inputs))
                loss = criterion(logits, labels[sl].to(device)) * (len(labels[sl]) / n)
                loss.backward()
            losses.append(float(loss.detach()) * n / len(labels[sl]))
        if n:
            optimizer.step()
    return losses
