"""A run prepared once: its data, strategy, model and privacy plan (both noise multipliers).

``privfed`` prepares the run before anything starts (the CLI says what each phase does); a
simulation's ServerApp, in the same process, plays that very object. A deployed ServerApp runs in
another process and prepares the run from the config that travelled to it, in which both noise
multipliers are written: there they are checked against the budget, never searched again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from privfed.audit.canaries import audited_data
from privfed.config import ConfigError, RunConfig
from privfed.models.backbone import adapter_names
from privfed.privacy.accountant import check_configured
from privfed.privacy.calibration import BudgetUnreachableError, user_noise_multiplier
from privfed.privacy.secure_plan import SecurePlanError
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.registry import build_strategy

# A phase of the preparation as it happens: (phase, what it did), for the console.
Phase = Callable[[str, str], None]


def _quiet(phase: str, detail: str) -> None:
    pass


@dataclass
class PreparedRun:
    cfg: RunConfig  # with the planned noise multipliers written in
    data: Any  # FederatedData: the clients' partitions, validation and test splits
    strategy: AdapterStrategy  # its plan made (FedMentor's domain sigmas)
    model: torch.nn.Module  # the server's model: evaluation and the initial state

    @property
    def sigma(self) -> float | None:
        """DP-SGD's noise multiplier (None: no DP-SGD, or the strategy's own mechanism)."""
        return self.cfg.planned_noise_multiplier

    @property
    def user_sigma(self) -> float | None:
        """DP-FedAvg's noise multiplier (None unless privacy.unit=user)."""
        return self.cfg.planned_user_noise_multiplier


def prepare_run(cfg: RunConfig, phase: Phase = _quiet) -> PreparedRun:
    """Build the run's strategy, data and model and make its privacy plan, once.

    Raises ValueError ("<key>: why") on what the strategy refuses, BudgetUnreachableError when
    the record-level budget cannot be met, ConfigError when the user-level one cannot.
    """
    check_configured(cfg)  # a deployed ServerApp's config did not pass the CLI
    secure = cfg.privacy.user_level and cfg.privacy.user.aggregation == "secure"
    if not secure:  # DP-FedAvg's sigma needs the config alone; the strategy's reads the plan
        cfg = _plan_user_sigma(cfg, None)
    strategy = build_strategy(cfg)
    started = time.perf_counter()
    features = ", encoding it (the head's features)" if cfg.recipe.trains == "head" else ""
    phase("data", f"loading and tokenising {cfg.data.name}{features} (cached after the first run)")
    data = audited_data(cfg)  # an audit's canaries are records: they count in the sizes
    sizes = data.sizes()
    phase(
        "data",
        f"{len(sizes)} clients with {min(sizes)}-{max(sizes)} training examples each, "
        f"{len(data.validation)} validation and {len(data.test)} test examples, "
        f"{data.num_classes} classes ({time.perf_counter() - started:.1f} s)",
    )
    started = time.perf_counter()
    model = strategy.new_model(data)  # the adapter's skeleton (e.g. a LoRA-SB rank too large)
    parameters = sum(p.numel() for p in model.parameters())
    what = f"{cfg.model.name}, {parameters:,} parameters"
    if cfg.recipe.trains == "head":
        what = (
            f"a linear head ({parameters:,} parameters) on {cfg.model.name}'s frozen "
            f"features at {cfg.model.max_length} tokens (computed once, cached)"
        )
    phase("model", f"{what}, strategy {cfg.strategy.name} ({time.perf_counter() - started:.1f} s)")
    sigma = strategy.calibrate_noise(data, model)
    cfg = cfg.model_copy(update={"planned_noise_multiplier": sigma})
    user_dp = strategy.user_dp
    if secure and user_dp is not None:  # secure aggregation's plan needs the update's size
        state = strategy.init_state(model, adapter_names(model))
        user_dp.dim = sum(t.numel() for t in strategy.declared_payload(state).values())
        cfg = _plan_user_sigma(cfg, user_dp.dim)
        user_dp.cfg = cfg
        plan = user_dp.secure_plan
        phase(
            "privacy",
            f"secure aggregation: each device adds discrete Gaussian noise of std {plan.sigma:.4g}"
            f" on a lattice of spacing {plan.gamma:.3g} to its update ({plan.dim:,} numbers, "
            f"clipped to {plan.clip:g}); the server sees only the sum, in which {plan.survivors} "
            f"guaranteed survivors give noise multiplier {plan.noise_multiplier:.4g}",
        )
    strategy.cfg = cfg  # the same run, its plan now written in
    if user_dp is not None:
        _ = user_dp.update_sigma  # adaptive clipping: room for the count's noise
    return PreparedRun(cfg, data, strategy, model)


def _plan_user_sigma(cfg: RunConfig, dim: int | None) -> RunConfig:
    """The config with DP-FedAvg's noise multiplier planned (None unless privacy.unit=user);
    ConfigError when the per-user budget cannot be met."""
    try:
        user_sigma = user_noise_multiplier(cfg, dim)
    except (BudgetUnreachableError, SecurePlanError) as err:
        text = str(err)
        raise ConfigError(
            text if text.startswith("privacy.") else f"privacy.user.epsilon: {text}"
        ) from None
    return cfg.model_copy(update={"planned_user_noise_multiplier": user_sigma})
