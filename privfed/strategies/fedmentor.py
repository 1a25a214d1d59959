"""FedMentor's domain-aware noise (``strategy=fedmentor``): "FedMentor: Domain-Aware
Differential Privacy for Heterogeneous Federated LLMs".

Every client belongs to a domain ``d`` with a sensitivity ``s_d`` and its own budget
``(eps_d, delta)`` (``privfed/conf/strategy/fedmentor.yaml``). Before round 1
(:func:`domain_sigmas`):
``sigma_base`` is calibrated so that the least sensitive domain meets its budget over the planned
rounds, ``sigma_d = sigma_base * s_d``, and each ``sigma_d`` is checked against its own ``eps_d``
and raised to the calibrated value where it falls short.

After each round the server evaluates the global model on each domain's validation split (the
server's public validation examples of the domain's labels, never the test split: server-side
data, so the decision costs no privacy). A domain whose utility is below ``utility_threshold`` gets
``sigma_d <- max(sigma_min, gamma * sigma_d)`` for the next round, but only if the accountant
confirms that every client of the domain still fits ``eps_d`` when all remaining rounds run at
the lower sigma; otherwise sigma stays and the metrics say the budget decided. Noise is never
lowered silently: every round's metrics line carries each domain's sigma, spent epsilon,
utility and decision.

FedMentor is a noise policy over a base strategy: what clients train and send, and how the
server aggregates it, are the base's (``base: lora`` by default; any registered strategy that
declares ``supports.noise_policy_base``: a round of plain DP-SGD at one sigma, which the
policy sets per domain), with the base's own settings from its YAML.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field

from privfed.config import RunConfig
from privfed.privacy.accountant import epsilon
from privfed.privacy.calibration import (
    BudgetUnreachableError,
    calibrate_dp_sgd,
    client_plans,
    fixed_sigma,
    run_epsilon,
)
from privfed.privacy.events import PrivacyEvent, SampledGaussianEvent
from privfed.privacy.invariants import required
from privfed.strategies.base import AdapterStrategy, Supports
from privfed.strategies.settings import Fraction, Positive, StrategySettings
from privfed.tensors import State

DOMAIN_SIGMAS = "fedmentor-sigmas"  # round config key: JSON {domain: sigma}


class Domain(BaseModel):
    """One domain: its sensitivity s_d, its budget (null: privacy.epsilon), its validation
    labels (the utility that steers its sigma)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sensitivity: Positive
    epsilon: Positive | None
    labels: list[str] | None


class FedMentorSettings(StrategySettings):
    base: str  # the strategy underneath: any that supports a noise policy (lora, ffa_lora, ...)
    domains: dict[str, Domain] = Field(min_length=1)
    client_domains: list[str] | None  # the domain of each partition; null: round-robin
    utility_threshold: Fraction  # a domain below this validation accuracy gets less noise,
    gamma: Fraction  # sigma_d <- max(sigma_min, gamma * sigma_d),
    sigma_min: Positive  # but only if its clients still fit their budget


def client_domains(settings: FedMentorSettings, num_clients: int) -> list[str]:
    """The domain of every partition: ``client_domains`` or round-robin over the domains."""
    if settings.client_domains is not None:
        return list(settings.client_domains)
    domains = list(settings.domains)
    return [domains[i % len(domains)] for i in range(num_clients)]


def domain_sigmas(
    sensitivities: dict[str, float],
    budgets: dict[str, float],
    worst_epsilon: Callable[[str, float], float],
    calibrate: Callable[[str, float], float],
    sigma_base: float | None = None,
) -> tuple[float, dict[str, float]]:
    """(sigma_base, {domain: sigma_d}) by FedMentor's rule.

    ``worst_epsilon(d, sigma)``: epsilon the worst client of ``d`` spends over the run at
    ``sigma``; ``calibrate(d, eps)``: the smallest sigma meeting ``eps`` for every client of
    ``d``. ``sigma_base`` given: use it instead of calibrating on the least sensitive domain.
    """
    least = min(sensitivities, key=lambda d: (sensitivities[d], d))
    if sigma_base is None:
        sigma_base = calibrate(least, budgets[least]) / sensitivities[least]
    sigmas = {}
    for d, s in sensitivities.items():
        sigma = sigma_base * s
        if worst_epsilon(d, sigma) > budgets[d]:
            sigma = max(sigma, calibrate(d, budgets[d]))  # raised to meet the domain's budget
        sigmas[d] = sigma
    return sigma_base, sigmas


def lowered_sigma(
    sigma: float,
    utility: float,
    threshold: float,
    gamma: float,
    sigma_min: float,
    fits: Callable[[float], bool],
) -> tuple[float, str]:
    """The next round's sigma of one domain and why: ``kept`` (utility is enough), ``lowered``,
    ``budget`` (a lower sigma would not fit the budget), ``at_min`` (already at sigma_min)."""
    if utility >= threshold:
        return sigma, "kept"
    candidate = max(sigma_min, gamma * sigma)
    if candidate >= sigma:
        return sigma, "at_min"
    if not fits(candidate):
        return sigma, "budget"
    return candidate, "lowered"


def _base_strategy(name: str, cfg: RunConfig) -> AdapterStrategy:
    """The base strategy, with its own settings as its YAML gives them (the only source)."""
    from privfed.strategies.registry import STRATEGIES, default_settings

    return STRATEGIES[name](cfg, default_settings(name))


class FedMentor(AdapterStrategy):
    name = "fedmentor"
    supports: ClassVar[Supports] = Supports(
        user_level=False,
        why_not_user_level="its domain-aware noise is record-level DP-SGD noise per domain",
        head_alone=True,
    )
    Settings = FedMentorSettings
    settings: FedMentorSettings

    def __init__(self, cfg: RunConfig, settings: StrategySettings | None = None) -> None:
        super().__init__(cfg, settings)
        self.base = _base_strategy(self.settings.base, cfg)
        self.domains = self.settings.domains
        self.client_domain = client_domains(self.settings, cfg.federation.num_clients)
        self.sigmas: dict[str, float] = {}
        self.sigma_base: float | None = None
        self.plans: list[tuple[float, int]] = []

    @classmethod
    def check_settings(cls, settings: FedMentorSettings, cfg: RunConfig) -> None:
        from privfed.strategies.registry import STRATEGIES, supporting

        bases = supporting("noise_policy_base")
        if settings.base not in bases:
            why = (
                "not a registered strategy"
                if settings.base not in STRATEGIES
                else ("its round is not plain DP-SGD at one sigma (supports.noise_policy_base)")
            )
            raise ValueError(
                f"strategy.base: {settings.base!r} cannot carry FedMentor's noise: {why}; "
                f"use one of {', '.join(bases)}"
            )
        if cfg.recipe.trains == "head" and not STRATEGIES[settings.base].supports.head_alone:
            heads = [b for b in bases if STRATEGIES[b].supports.head_alone]
            raise ValueError(
                f"strategy.base: {settings.base} aggregates LoRA factors, and recipe=head trains "
                f"a head alone; use base={', '.join(heads)}"
            )
        if cfg.data.validation_fraction == 0:
            raise ValueError(
                "data.validation_fraction: FedMentor's utility signal reads the validation split "
                "(never the test split); give it one (> 0)"
            )
        given = settings.client_domains
        if given is None:
            return
        if len(given) != cfg.federation.num_clients:
            raise ValueError(
                f"strategy.client_domains: has {len(given)} entries for "
                f"{cfg.federation.num_clients} clients"
            )
        for i, d in enumerate(given):
            if d not in settings.domains:
                raise ValueError(
                    f"strategy.client_domains: client {i} has unknown domain {d!r} "
                    f"(known: {sorted(settings.domains)})"
                )

    # -- the base strategy's model, training and aggregation -------------------------------------
    def init_state(self, model: torch.nn.Module, names: list[str]) -> State:
        return self.base.init_state(model, names)

    def check_payload(self, payload: State, global_state: State) -> None:
        self.base.check_payload(payload, global_state)

    def trainable(self, name: str) -> bool:
        return self.base.trainable(name)

    def fixed(self, name: str) -> bool:
        return self.base.fixed(name)

    def client_payload(self, global_state: State, local_state: State) -> State:
        return self.base.client_payload(global_state, local_state)

    def aggregate(self, global_state: State, payloads: list[State], weights: list[float]) -> State:
        return self.base.aggregate(global_state, payloads, weights)

    def round_metrics(
        self, global_state: State, payloads: list[State], weights: list[float]
    ) -> dict[str, float]:
        return self.base.round_metrics(global_state, payloads, weights)

    # -- per-domain privacy ---------------------------------------------------------------------
    def domain_budget(self, domain: str) -> float:
        eps = self.domains[domain].epsilon
        return eps if eps is not None else required(self.cfg.privacy.epsilon, "privacy.epsilon")

    def members(self, domain: str) -> list[int]:
        return [i for i, d in enumerate(self.client_domain) if d == domain]

    def check_labels(self, label_names: list[str]) -> None:
        for d, spec in self.domains.items():
            unknown = [x for x in spec.labels or [] if x not in label_names]
            if unknown:
                raise ValueError(
                    f"strategy.domains.{d}.labels: unknown labels {unknown} (known: {label_names})"
                )

    def calibrate_noise(self, data: Any, model: torch.nn.Module) -> float | None:
        self.check_labels(data.label_names)
        sizes = data.sizes()
        if not self.cfg.privacy.enabled:
            return None

        delta = required(self.cfg.privacy.delta, "privacy.delta")
        method = self.cfg.privacy.accountant.method
        rounds = self.cfg.num_rounds
        self.plans = client_plans(sizes, self.cfg.train)
        used = set(self.client_domain)

        def plans_of(d: str) -> list[tuple[float, int]]:
            return [self.plans[i] for i in self.members(d)]

        def worst(d: str, sigma: float) -> float:
            return run_epsilon(plans_of(d), sigma, rounds, delta, method=method)

        def calibrate(d: str, eps: float) -> float:
            try:
                return calibrate_dp_sgd(plans_of(d), rounds, eps, delta, method=method)
            except BudgetUnreachableError as err:
                raise BudgetUnreachableError(f"domain {d!r}: {err}") from None

        self.sigma_base, self.sigmas = domain_sigmas(
            {d: self.domains[d].sensitivity for d in sorted(used)},
            {d: self.domain_budget(d) for d in used},
            worst,
            calibrate,
            sigma_base=fixed_sigma(self.cfg),  # given, or calibrated once before start
        )
        return self.sigma_base

    def summary_metrics(self) -> dict[str, Any]:
        """Each domain's own target (its budget) and sigma: epsilon_target is only the largest."""
        if not self.cfg.privacy.enabled:
            return {}
        used = sorted(set(self.client_domain))
        return {
            "epsilon_target_by_domain": {d: self.domain_budget(d) for d in used},
            "noise_multiplier_by_domain": {d: self.sigmas[d] for d in used if d in self.sigmas},
        }

    def client_budget(self, partition_id: int) -> float | None:
        if not self.cfg.privacy.enabled:
            return None
        return self.domain_budget(self.client_domain[partition_id])

    def round_config(self, server_round: int, client: int) -> dict[str, Any]:
        own = {DOMAIN_SIGMAS: json.dumps(self.sigmas, sort_keys=True)} if self.sigmas else {}
        return {**self.base.round_config(server_round, client), **own}

    def client_noise_multiplier(self, config: ConfigRecord) -> float:
        if self.client is None:
            raise RuntimeError("client_noise_multiplier: on a client only (after on_client)")
        return float(json.loads(str(config[DOMAIN_SIGMAS]))[self.client_domain[self.client]])

    def end_round(
        self,
        server_round: int,
        evaluate_labels: Callable[[list[str] | None], float],
        events_of: Callable[[int], list[PrivacyEvent]],
    ) -> dict[str, Any]:
        """Per-domain utility, epsilon and sigma of this round, and the next round's sigma."""
        metrics: dict[str, Any] = {}
        gamma, sigma_min = self.settings.gamma, self.settings.sigma_min
        threshold = self.settings.utility_threshold
        remaining = self.cfg.num_rounds - server_round
        delta = required(self.cfg.privacy.delta, "privacy.delta")
        method = self.cfg.privacy.accountant.method
        for d in sorted(set(self.client_domain)):
            utility = evaluate_labels(self.domains[d].labels)
            metrics[f"domain/{d}/utility"] = utility
            if not self.sigmas:
                continue
            budget = self.domain_budget(d)

            def fits(sigma: float, d: str = d, budget: float = budget) -> bool:
                return all(
                    epsilon(
                        [*events_of(i), SampledGaussianEvent(q, sigma, s * remaining)]
                        if remaining
                        else events_of(i),
                        delta,
                        method,
                    )
                    <= budget
                    for i in self.members(d)
                    for q, s in [self.plans[i]]
                )

            spent = max(
                (epsilon(events_of(i), delta, method) for i in self.members(d)), default=0.0
            )
            sigma = self.sigmas[d]
            nxt, why = (sigma, "last_round")
            if remaining:
                nxt, why = lowered_sigma(sigma, utility, threshold, gamma, sigma_min, fits)
            self.sigmas[d] = nxt
            metrics.update(
                {
                    f"domain/{d}/sigma": sigma,
                    f"domain/{d}/sigma_next": nxt,
                    f"domain/{d}/epsilon": spent,
                    f"domain/{d}/epsilon_budget": budget,
                    f"domain/{d}/decision": why,
                }
            )
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"sigmas": dict(self.sigmas), "base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sigmas = {str(k): float(v) for k, v in state.get("sigmas", {}).items()}
        self.base.load_state_dict(state.get("base", {}))
