"""Fed-SB (``strategy=fed_sb``): "Fed-SB: A Silver Bullet for Extreme Communication Efficiency
and Performance in (Private) Federated LoRA Fine-Tuning" (Singhal et al. 2025), on LoRA-SB.

The adapter is ``s * B R A`` with ``B`` and ``A`` fixed and only ``R`` (r x r) trained
(models/lora_sb.py). Clients send ``R_k`` (r^2 numbers per adapted matrix, whatever d_in, d_out
and the number of clients) and the head; the server averages them. Exact:
``B (sum w R_k) A = sum w B R_k A``. Under DP only ``R`` (and the head) is noised, with no
noise x noise cross term.

Initialisation (``strategy.init``):

* ``random``: random orthonormal ``B``, ``A`` (from the run seed), ``R = 0``; charges nothing;
* ``svd`` (LoRA-SB): before round 1 every client releases a clipped, noised sum of per-example
  gradients of the target weights ``W0`` (one Gaussian mechanism, ``GaussianEvent(sigma_init)``,
  its noise from a fresh secret stream (privfed/randomness.py), charged to the accountant like
  every other release); the server sums them, estimates the
  first full fine-tuning update ``dW = -init_scale * g_mean`` and sets ``B = U_r``, ``A = V_r^T``,
  ``R = Sigma_r / s`` from its truncated SVD. DP-SGD's noise is then calibrated to what is left.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import reduce
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from privfed.config import ModelConfig, RunConfig
from privfed.models.lora_sb import svd_factors
from privfed.privacy.calibration import calibrate_sigma
from privfed.privacy.events import GaussianEvent, PrivacyEvent
from privfed.privacy.invariants import required
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.lora import fedavg
from privfed.strategies.settings import Count, Positive, StrategySettings
from privfed.tensors import State, weighted_mean


def is_sb_r(name: str) -> bool:
    return ".sb_R." in name


def is_sb_factor(name: str) -> bool:
    return ".sb_A." in name or ".sb_B." in name


def sb_triples(names: list[str]) -> list[tuple[str, str, str]]:
    """(B name, R name, A name) of every LoRA-SB module among ``names``."""
    return sorted(
        (n.replace(".sb_R.", ".sb_B."), n, n.replace(".sb_R.", ".sb_A."))
        for n in names
        if is_sb_r(n)
    )


def base_weight_name(r_name: str) -> str:
    """The frozen target weight ``W0`` of the module that owns ``r_name``."""
    return r_name.replace(".sb_R.weight", ".base_layer.weight")


def aggregate_r(global_state: State, payloads: list[State], weights: list[float]) -> State:
    """FedAvg of what travelled (each ``R`` and the head); ``B`` and ``A`` stay as they are."""
    return {**global_state, **fedavg(payloads, weights)}


def svd_init(
    global_state: State,
    gradient_sums: Sequence[State],
    num_examples: list[int],
    rank: int,
    scaling: float,
    init_scale: float,
) -> State:
    """LoRA-SB init from the clients' (noised) gradient sums of each target ``W0``: the global
    state with ``B = U_r``, ``R = Sigma_r / s``, ``A = V_r^T`` of ``-init_scale * g_mean``."""
    total = float(sum(num_examples))
    new = dict(global_state)
    for b_name, r_name, a_name in sb_triples(list(global_state)):
        w_name = base_weight_name(r_name)
        g_mean = reduce(operator.add, (s[w_name].double() for s in gradient_sums)) / total
        b, r, a = svd_factors(-init_scale * g_mean, rank, scaling)
        new[b_name], new[r_name], new[a_name] = b, r, a
    return new


class FedSB(AdapterStrategy):
    name = "fed_sb"
    adapter: ClassVar[str] = "lora_sb"

    class Settings(StrategySettings):
        rank: Count | None  # r of R (r x r); null: model.lora.r
        init: Literal["svd", "random"]  # svd: B, A from a DP estimate of the first update
        init_noise_multiplier: Positive | None  # null: calibrated from init_budget_share
        init_budget_share: Annotated[float, Field(strict=True, gt=0, lt=1)]
        init_scale: Positive

    settings: Settings

    @classmethod
    def check_settings(cls, settings: Settings, cfg: RunConfig) -> None:
        if cfg.model.pooling == "mean":
            raise ValueError("model.pooling: mean is built on peft LoRA; not with strategy=fed_sb")
        if cfg.privacy.user_level and settings.init == "svd":
            raise ValueError(
                "privacy.unit: Fed-SB's svd init is a record-level release; with "
                "privacy.unit=user use strategy.init=random"
            )

    @property
    def model_config(self) -> ModelConfig:
        """``model.*`` with LoRA-SB's own rank: ``r`` set to ``strategy.rank`` and ``alpha``
        moved with it, so the adapter's scaling ``alpha / r`` stays the model's (the learning
        rate keeps its meaning across ranks)."""
        model, rank = self.cfg.model, self.settings.rank
        if rank is None or rank == model.lora.r:
            return model
        scaling = model.lora.alpha / model.lora.r
        lora = model.lora.model_copy(update={"r": rank, "alpha": scaling * rank})
        return model.model_copy(update={"lora": lora})

    @property
    def init_mode(self) -> str:
        return self.settings.init

    @property
    def init_sigma(self) -> float:
        """``init_noise_multiplier``, or (null) the smallest sigma whose Gaussian release alone
        spends ``init_budget_share`` of the client's epsilon."""
        given = self.settings.init_noise_multiplier
        if given is not None:
            return given
        p = self.cfg.privacy
        epsilon, delta = required(p.epsilon, "privacy.epsilon"), required(p.delta, "privacy.delta")
        share = self.settings.init_budget_share
        return calibrate_sigma(
            lambda s: [GaussianEvent(sigma=s)], share * epsilon, delta, method=p.accountant.method
        )

    def trainable(self, name: str) -> bool:
        return not is_sb_factor(name)

    def fixed(self, name: str) -> bool:
        return is_sb_factor(name)  # after the init exchange; sent to each node once

    def aggregate(self, global_state: State, payloads: list[State], weights: list[float]) -> State:
        return aggregate_r(global_state, payloads, weights)

    def round_metrics(
        self, global_state: State, payloads: list[State], weights: list[float]
    ) -> dict[str, float]:
        """``aggregation_error`` of the product ``B R A``: ~0, as B and A are shared."""
        num = den = 0.0
        for b, r, a in sb_triples(list(global_state)):
            bb, aa = global_state[b].double(), global_state[a].double()
            exact = weighted_mean([bb @ p[r].double() @ aa for p in payloads], weights)
            got = bb @ weighted_mean([p[r].double() for p in payloads], weights) @ aa
            num += float((exact - got).pow(2).sum())
            den += float(exact.pow(2).sum())
        return {"aggregation_error": (num / den) ** 0.5 if den > 0 else 0.0}

    # -- the data-dependent initialisation (svd only) ------------------------------------------
    def has_init_round(self) -> bool:
        return self.init_mode == "svd"

    def init_events(self) -> list[PrivacyEvent]:
        if self.has_init_round() and self.cfg.privacy.enabled:
            return [GaussianEvent(sigma=self.init_sigma)]
        return []

    def init_gradient_names(self, global_state: State) -> list[str]:
        return [base_weight_name(r) for _, r, _ in sb_triples(list(global_state))]

    def aggregate_init(
        self, global_state: State, payloads: Sequence[State], num_examples: list[int]
    ) -> State:
        lora = self.model_config.lora
        return svd_init(
            global_state,
            payloads,
            num_examples,
            lora.r,
            lora.alpha / lora.r,
            self.settings.init_scale,
        )
