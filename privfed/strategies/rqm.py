"""RQM (``strategy=rqm``): "Randomized Quantization is All You Need for Differential Privacy in
Federated Learning" (Youn et al. 2023). The mechanism is in privacy/rqm.py; this module is the
federated protocol around it, on the LoRA/FedAvg base. Clients upload packed level indices
(``ceil(log2 m)`` bits per coordinate), never floats.

Two modes, both honest about their privacy:

* ``compress`` (default): clients train with DP-SGD as usual; their update ``local - global``
  is quantized by RQM before upload (post-processing of a DP release: no extra epsilon). Each
  tensor is quantized on its own range ``c_t = max |update|`` (one float32 per tensor travels
  with the indices; also post-processing). The server decodes the unbiased updates and averages.
The level sampling and the randomized rounding are drawn from a fresh secret stream per release
under DP (privfed/randomness.py): in privacy mode they are the whole mechanism, and a server that
could re-create them would see deterministic rounding. Without DP they are seeded.

* ``privacy``: no Gaussian noise; the privacy comes from RQM alone. Each round a client releases
  the mean over its examples of per-example gradients clipped coordinate-wise to ``[-c, c]``
  (``strategy.clip``), quantized by RQM with the fixed ``c``; one record moves each coordinate by
  at most ``2c / n``. The event (``RQMEvent``) goes to the accountant as an RDP curve and the
  server takes a FedSGD step ``-server_lr * mean``. The epsilon it gives is reported as it is;
  a budget it cannot meet is refused before start, with the epsilon it would spend.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from privfed.config import RunConfig
from privfed.privacy.accountant import epsilon
from privfed.privacy.calibration import BudgetUnreachableError
from privfed.privacy.events import RQMEvent
from privfed.privacy.invariants import required
from privfed.privacy.rqm import (
    dequantize,
    pack_indices,
    packed_size,
    quantize,
    unpack_indices,
)
from privfed.privacy.rqm_accounting import MAX_ACCOUNTED_LEVELS
from privfed.randomness import RandomStream
from privfed.strategies.base import InvalidReply, Supports
from privfed.strategies.lora import LoraFedAvg
from privfed.strategies.settings import Fraction, Positive, StrategySettings
from privfed.tensors import State, weighted_mean

SCALE = "::scale"  # suffix of a tensor's range c_t in compress mode


class RQM(LoraFedAvg):
    name = "rqm"
    supports: ClassVar[Supports] = Supports(
        user_level=False,
        why_not_user_level="its payload is quantized level indices, not tensors to clip and "
        "noise (and its privacy mode is its own record-level mechanism)",
        head_alone=True,
        noise_policy_base=False,  # its privacy mode is its own mechanism
    )

    class Settings(StrategySettings):
        mode: Literal["compress", "privacy"]
        levels: Annotated[int, Field(strict=True, ge=2, le=256)]  # m >= 2
        keep_prob: Fraction  # q
        range_extension: Positive  # Delta / c
        clip: Positive  # privacy mode: per-coordinate bound c
        server_lr: Positive  # privacy mode

    settings: Settings

    def __init__(self, cfg: RunConfig, settings: StrategySettings | None = None) -> None:
        super().__init__(cfg, settings)
        self.mode = self.settings.mode
        self.m = self.settings.levels
        self.q = self.settings.keep_prob
        self.range_extension = self.settings.range_extension
        self.clip = self.settings.clip
        self.server_lr = self.settings.server_lr

    @classmethod
    def check_settings(cls, settings: Settings, cfg: RunConfig) -> None:
        mode, m, q = settings.mode, settings.levels, settings.keep_prob
        if mode == "privacy" and not cfg.privacy.enabled:
            raise ValueError(
                "strategy.mode: privacy needs privacy=dp_sgd (its epsilon and delta are the "
                "budget RQM is accounted against; no Gaussian noise is added in this mode)"
            )
        if mode == "privacy" and m > MAX_ACCOUNTED_LEVELS:
            raise ValueError(
                f"strategy.levels: must be <= {MAX_ACCOUNTED_LEVELS} in privacy mode (the most "
                f"levels the accountant prices exactly; privacy/rqm_accounting.py), got {m}"
            )
        if mode == "privacy" and q >= 1:
            raise ValueError(
                "strategy.keep_prob: must be < 1 in privacy mode (with every level kept RQM is "
                "deterministic rounding between two levels: no privacy at all)"
            )

    # -- privacy plan ---------------------------------------------------------------------------
    def uses_own_mechanism(self) -> bool:
        return self.mode == "privacy"

    def planned_event(self, num_examples: int, dims: int) -> RQMEvent:
        """One round of privacy mode on a client with ``num_examples`` examples."""
        return RQMEvent(
            c=self.clip,
            delta=self.range_extension * self.clip,
            m=self.m,
            q=self.q,
            sensitivity=2.0 * self.clip / num_examples,
            dims=dims,
        )

    def calibrate_noise(self, data: Any, model: torch.nn.Module) -> float | None:
        if self.mode == "compress":
            return super().calibrate_noise(data, model)
        sizes = data.sizes()
        budget = required(self.cfg.privacy.epsilon, "privacy.epsilon")
        delta = required(self.cfg.privacy.delta, "privacy.delta")
        dims = self.released_dims(model)
        rounds = self.cfg.num_rounds
        worst = max(
            epsilon(
                [replace(self.planned_event(n, dims), count=rounds)],
                delta,
                self.cfg.privacy.accountant.method,
            )
            for n in set(sizes)
        )
        if worst > budget:
            raise BudgetUnreachableError(
                f"rqm in privacy mode spends epsilon={worst:.4g} over {self.cfg.num_rounds} rounds "
                f"({dims} coordinates per release), more than privacy.epsilon="
                f"{self.cfg.privacy.epsilon}; lower strategy.keep_prob, raise "
                "strategy.range_extension, or raise privacy.epsilon to run it anyway"
            )
        return None  # no Gaussian noise in this mode

    def released_dims(self, model: torch.nn.Module) -> int:
        """Coordinates a privacy-mode release holds (every trainable adapter tensor)."""
        from privfed.models.backbone import adapter_state

        return sum(t.numel() for n, t in adapter_state(model).items() if self.trainable(n))

    # -- client side ----------------------------------------------------------------------------
    def _stream(self) -> RandomStream:
        """The level sampling and rounding of one release: secret and fresh under DP (in
        privacy mode they are the mechanism), seeded from (run, client, round) without DP."""
        if self.cfg.privacy.enabled:
            return RandomStream.secret("rqm.quantize")
        client = self.client if self.client is not None else 0
        return RandomStream.public(self.cfg.seed, "rqm.quantize", client, self.server_round)

    def _encode(self, values: State, c_of: dict[str, float]) -> State:
        stream = self._stream()
        out: State = {}
        for name in sorted(values):
            c = c_of[name]
            idx = quantize(values[name], c, self.range_extension * c, self.m, self.q, stream)
            out[name] = pack_indices(idx, self.m)
        return out

    def client_payload(self, global_state: State, local_state: State) -> State:
        names = [n for n in local_state if self.trainable(n)]
        if self.mode == "privacy":  # the release is built by private_release, not from a state
            return {
                n: torch.zeros(packed_size(local_state[n].numel(), self.m), dtype=torch.uint8)
                for n in names
            }
        update = {n: (local_state[n] - global_state[n]).float() for n in names}
        scales = {n: max(float(update[n].abs().max()), 1e-12) for n in names}
        payload = self._encode(update, scales)
        payload.update({n + SCALE: torch.tensor(scales[n], dtype=torch.float32) for n in names})
        return payload

    def private_release(
        self, model: torch.nn.Module, local: Any, batch_size: int, device: str
    ) -> State:
        """Privacy mode: RQM of the mean of per-example gradients clipped to [-c, c]."""
        from privfed.privacy.gradients import clipped_gradient_sum

        names = [n for n, p in model.named_parameters() if p.requires_grad]
        sums = clipped_gradient_sum(model, local, names, "linf", self.clip, batch_size, device)
        mean = {n: t / len(local) for n, t in sums.items()}
        return self._encode(mean, dict.fromkeys(names, self.clip))

    # -- server side ----------------------------------------------------------------------------
    def check_payload(self, payload: State, global_state: State) -> None:
        for name, ref in global_state.items():
            if not self.trainable(name):
                continue
            idx = unpack_indices(payload[name], self.m, ref.numel())
            if int(idx.max()) >= self.m:
                raise InvalidReply(f"{name}: level index >= m={self.m}")
            if self.mode == "compress" and float(payload[name + SCALE]) < 0:
                raise InvalidReply(f"{name}: negative range")

    def decode(self, payload: State, global_state: State) -> State:
        """The values a payload stands for (updates in compress mode, gradients in privacy)."""
        out: State = {}
        for name, ref in global_state.items():
            if not self.trainable(name):
                continue
            c = float(payload[name + SCALE]) if self.mode == "compress" else self.clip
            idx = unpack_indices(payload[name], self.m, ref.numel()).reshape(ref.shape)
            out[name] = dequantize(idx, c, self.range_extension * c, self.m).to(ref.dtype)
        return out

    def aggregate(self, global_state: State, payloads: list[State], weights: list[float]) -> State:
        decoded = [self.decode(p, global_state) for p in payloads]
        step = 1.0 if self.mode == "compress" else -self.server_lr
        new = dict(global_state)
        for name in decoded[0]:
            mean = weighted_mean([d[name] for d in decoded], weights)
            new[name] = global_state[name] + step * mean
        return new

    def round_metrics(
        self, global_state: State, payloads: list[State], weights: list[float]
    ) -> dict[str, float]:
        metrics: dict[str, float] = {"bits_per_coordinate": float(math.ceil(math.log2(self.m)))}
        if self.mode == "compress":  # the LoRA product error of the decoded client states
            decoded = [
                {n: global_state[n] + t for n, t in self.decode(p, global_state).items()}
                for p in payloads
            ]
            metrics.update(super().round_metrics(global_state, decoded, weights))
        return metrics
