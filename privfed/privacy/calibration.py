"""Noise calibration: the smallest noise multiplier that meets a target (epsilon, delta).

Binary search over sigma, as Opacus's ``get_noise_multiplier`` does, but to a relative
tolerance on sigma (not on epsilon), so the result is provably within ``rel_tol`` of minimal:
``epsilon(sigma) <= target`` and ``epsilon(sigma / (1 + rel_tol)) > target``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from privfed.privacy.accountant import DEFAULT_METHOD, Method, epsilon
from privfed.privacy.events import SIGMA_RANGE, GaussianEvent, PrivacyEvent, SampledGaussianEvent
from privfed.privacy.invariants import required
from privfed.privacy.secure_plan import secure_plan

if TYPE_CHECKING:
    from privfed.config import RunConfig, TrainConfig

SIGMA_MAX = 1e4


class BudgetUnreachableError(ValueError):
    """No noise multiplier up to SIGMA_MAX meets the requested budget."""


def calibrate_sigma(
    make_events: Callable[[float], Sequence[PrivacyEvent]],
    target_epsilon: float,
    delta: float,
    rel_tol: float = 1e-3,
    method: Method = DEFAULT_METHOD,
) -> float:
    """Smallest sigma (to ``rel_tol``) with ``epsilon(make_events(sigma), delta) <= target``
    under the accountant ``method`` (the one the ledger will enforce the budget with)."""
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")

    def eps_at(sigma: float) -> float:
        return epsilon(make_events(sigma), delta, method)

    hi = 1.0
    while eps_at(hi) > target_epsilon:
        hi *= 2.0
        if hi > SIGMA_MAX:
            raise BudgetUnreachableError(
                f"epsilon={target_epsilon} at delta={delta} cannot be met with any noise "
                f"multiplier <= {SIGMA_MAX:g}; raise epsilon, or lower rounds/local steps"
            )
    lo = hi / 2.0 if hi > 1.0 else 0.0
    if lo == 0.0:
        lo = 1e-3
        while eps_at(lo) <= target_epsilon and lo < hi:
            # Even tiny noise meets the budget: search down, then refine below.
            hi, lo = lo, lo / 2.0
            if lo < SIGMA_RANGE[0]:  # the least noise the accountant prices
                if eps_at(SIGMA_RANGE[0]) <= target_epsilon:
                    return SIGMA_RANGE[0]
                lo = SIGMA_RANGE[0]
                break
    while hi / lo > 1.0 + rel_tol:
        mid = (lo * hi) ** 0.5
        if eps_at(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def client_plans(sizes: Sequence[int], train: TrainConfig) -> list[tuple[float, int]]:
    """(sampling rate q, DP-SGD steps per round) of each client, from its number of examples
    and the public training config: what the server knows of each client's mechanism."""
    from privfed.privacy.dp_sgd import local_plan  # torch/Opacus only when needed

    return [(lp.q, lp.steps) for lp in (local_plan(n, train) for n in sizes)]


def fixed_sigma(cfg: RunConfig) -> float | None:
    """The run's noise multiplier when it is not to be searched for: the user's
    (privacy.noise_multiplier), else the one calibrated once before start and carried with the
    config (planned_noise_multiplier). Either is checked against the budget where it is used."""
    given = cfg.privacy.noise_multiplier
    return given if given is not None else cfg.planned_noise_multiplier


def run_epsilon(
    plans: Sequence[tuple[float, int]],
    sigma: float,
    num_rounds: int,
    delta: float,
    fixed_events: Sequence[PrivacyEvent] = (),
    method: Method = DEFAULT_METHOD,
) -> float:
    """Epsilon of the worst client that trains in all ``num_rounds`` rounds at ``sigma``, after
    ``fixed_events`` (the one definition of "epsilon of a run at sigma")."""
    return max(
        epsilon([*fixed_events, SampledGaussianEvent(q, sigma, s * num_rounds)], delta, method)
        for q, s in set(plans)
    )


def calibrate_dp_sgd(
    plans: Sequence[tuple[float, int]],
    num_rounds: int,
    target_epsilon: float,
    delta: float,
    fixed_events: Sequence[PrivacyEvent] = (),
    method: Method = DEFAULT_METHOD,
) -> float:
    """One sigma for every client: each plan is (q, steps per round) of one client, and the
    result meets the budget for the worst of them over ``num_rounds`` rounds, composed with
    ``fixed_events`` that every client spends besides (e.g. Fed-SB's DP initialisation)."""
    worst = 0.0
    for q, steps in sorted(set(plans)):

        def events(s: float, q: float = q, steps: int = steps) -> list[PrivacyEvent]:
            return [*fixed_events, SampledGaussianEvent(q=q, sigma=s, steps=steps * num_rounds)]

        sigma = calibrate_sigma(events, target_epsilon, delta, method=method)
        worst = max(worst, sigma)
    return worst


def noise_multiplier_for(
    cfg: RunConfig,
    sizes: list[int],
    fixed_events: Sequence[PrivacyEvent] = (),
    target_epsilon: float | None = None,
) -> float | None:
    """The DP-SGD noise multiplier of the run: calibrated (or checked, if given) so that every
    client meets (epsilon, delta) if it trains in every round, after ``fixed_events``.
    ``target_epsilon`` overrides ``privacy.epsilon`` (FedMentor's per-domain budgets).
    Raises BudgetUnreachableError."""
    p = cfg.privacy
    if not p.enabled:
        return None
    target = target_epsilon if target_epsilon is not None else p.epsilon
    target = required(target, "privacy.epsilon")
    delta = required(p.delta, "privacy.delta")
    method = p.accountant.method
    if cfg.num_rounds and fixed_events and epsilon(fixed_events, delta, method) >= target:
        raise BudgetUnreachableError(
            f"the strategy's one-off releases alone spend epsilon="
            f"{epsilon(fixed_events, delta, method):.3f} >= {target}; give them more noise"
        )
    if cfg.num_rounds == 0:  # the one-off releases alone (a prototypes-only head)
        spent = epsilon(fixed_events, delta, method) if fixed_events else 0.0
        if spent > target * (1 + 1e-9):
            raise BudgetUnreachableError(
                f"the one-off releases spend epsilon={spent:.3f} > {target}; give them more noise"
            )
        return None
    plans = client_plans(sizes, cfg.train)
    sigma = fixed_sigma(cfg)  # given or planned: checked, not searched again
    if sigma is None:
        return calibrate_dp_sgd(plans, cfg.num_rounds, target, delta, fixed_events, method)
    worst = run_epsilon(plans, sigma, cfg.num_rounds, delta, fixed_events, method)
    if worst > target:
        raise BudgetUnreachableError(
            f"privacy.noise_multiplier: {sigma} spends epsilon={worst:.3f} over "
            f"{cfg.num_rounds} rounds, more than the budget epsilon={target}; raise the noise or "
            "leave it null to calibrate"
        )
    return sigma


@functools.lru_cache(maxsize=32)
def _gaussian_for(epsilon_: float, delta: float, method: Method) -> float:
    """The noise multiplier of one Gaussian mechanism that spends exactly (epsilon, delta)."""
    return calibrate_sigma(lambda s: [GaussianEvent(sigma=s)], epsilon_, delta, method=method)


def prototype_noise_multiplier(cfg: RunConfig) -> float | None:
    """The head recipe's prototype release's noise multiplier (None without it or without DP).

    The budget as one Gaussian mechanism, sigma_all (the one that alone spends (epsilon,
    delta)); the prototypes take ``recipe.prototype_share`` of its 1 / sigma^2 (zCDP's rho,
    which adds up over Gaussian mechanisms): sigma_p = sigma_all / sqrt(share). The rounds' sigma
    is then calibrated to what is left, with the prototypes' event composed in exactly (PLD)."""
    p, recipe = cfg.privacy, cfg.recipe
    if not (p.enabled and recipe.prototypes):
        return None
    target = required(p.epsilon, "privacy.epsilon")
    sigma_all = _gaussian_for(target, required(p.delta, "privacy.delta"), p.accountant.method)
    return sigma_all / math.sqrt(recipe.prototype_share)


def recipe_events(cfg: RunConfig) -> list[PrivacyEvent]:
    """What the recipe releases once besides the rounds (the prototypes), for every client."""
    sigma = prototype_noise_multiplier(cfg)
    return [] if sigma is None else [GaussianEvent(sigma=sigma)]


def user_sampling_rate(cfg: RunConfig) -> float:
    """User-level DP's Poisson sampling rate: ``clients_per_round / num_clients``."""
    return cfg.federation.clients_per_round / cfg.federation.num_clients


def user_noise_multiplier(cfg: RunConfig, dim: int | None = None) -> float | None:
    """DP-FedAvg's noise multiplier (None unless ``privacy.unit=user``): the smallest whose
    ``num_rounds`` sampled Gaussian rounds at the sampling rate meet ``privacy.user.epsilon``,
    or the given one, checked against it. Under ``aggregation=secure`` the rounds are the
    distributed discrete Gaussian's (privacy/secure_plan.py), which needs ``dim``, the update's
    coordinates. Raises BudgetUnreachableError."""
    p = cfg.privacy
    if not p.user_level:
        return None
    user, rate = p.user, user_sampling_rate(cfg)
    if user.clip_only:  # a control: no noise, nothing to calibrate or check
        return 0.0
    target = required(user.epsilon, "privacy.user.epsilon")

    def events(sigma: float) -> list[PrivacyEvent]:
        if user.aggregation == "secure":
            size = required(dim, "the update's size (secure aggregation's plan)")
            return [secure_plan(cfg, rate, size, sigma).event(cfg.num_rounds)]
        return [SampledGaussianEvent(q=rate, sigma=sigma, steps=cfg.num_rounds)]

    # given, or calibrated once before start and carried with the config: checked, not searched
    given = user.noise_multiplier
    sigma = given if given is not None else cfg.planned_user_noise_multiplier
    if sigma is None:
        return calibrate_sigma(events, target, user.delta, method=p.accountant.method)
    spent = epsilon(events(sigma), user.delta, p.accountant.method)
    if spent > target:
        key = "privacy.user.noise_multiplier" if given is not None else "the planned user sigma"
        raise BudgetUnreachableError(
            f"{key}: {sigma} spends epsilon={spent:.3f} "
            f"per user over {cfg.num_rounds} rounds, more than privacy.user.epsilon={target}; "
            "raise the noise or leave it null to calibrate"
        )
    return sigma
