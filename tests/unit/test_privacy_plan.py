"""One privacy plan per run: sigma is calibrated once, before start, and travels with the config;
where it is used it is checked against the budget, never searched for again nor trusted blindly."""

from __future__ import annotations

import pytest

from privfed.config import ConfigError
from privfed.privacy import calibration
from privfed.privacy.calibration import BudgetUnreachableError
from privfed.strategies.registry import build_strategy

from ..helpers import TINY, compose_raw


def _no_search(*args, **kwargs):
    raise AssertionError("calibrated a second time")


@pytest.mark.parametrize("strategy", ["lora", "fed_sb", "fedmentor"])
def test_sigma_is_calibrated_once_and_reused_where_the_run_uses_it(strategy, monkeypatch):
    from privfed.cli import prepare
    from privfed.data.federated import federated_data

    cfg, sigma = prepare(compose_raw(*TINY, f"strategy={strategy}"))
    assert sigma is not None and cfg.planned_noise_multiplier == sigma
    reference = build_strategy(cfg.model_copy(update={"planned_noise_multiplier": None}))
    sizes = federated_data(cfg).sizes()
    reference.calibrate_noise(sizes)
    # The server (and a resumed or deployed ServerApp) builds its strategy from the config that
    # travels: it gets the same sigma without searching for it.
    monkeypatch.setattr(calibration, "calibrate_dp_sgd", _no_search)
    monkeypatch.setattr("privfed.strategies.fedmentor.calibrate_dp_sgd", _no_search)
    server = build_strategy(cfg)
    assert server.calibrate_noise(sizes) == sigma
    if strategy == "fedmentor":
        assert server.sigmas == reference.sigmas  # type: ignore[attr-defined]


def test_a_carried_sigma_below_the_budget_is_refused_where_it_is_used():
    # The config that travels is not trusted: a sigma too small for the budget (tampered with,
    # or from another run) fails the server's check instead of being used.
    from privfed.cli import prepare
    from privfed.data.federated import federated_data

    cfg, sigma = prepare(compose_raw(*TINY))
    assert sigma is not None
    tampered = cfg.model_copy(update={"planned_noise_multiplier": sigma * 0.9})
    with pytest.raises(BudgetUnreachableError, match="more than the budget"):
        build_strategy(tampered).calibrate_noise(federated_data(cfg).sizes())


def test_the_planned_sigma_is_not_a_setting():
    from privfed.cli import prepare

    with pytest.raises(ConfigError, match="planned_noise_multiplier: set by privfed"):
        prepare(compose_raw(*TINY, "+planned_noise_multiplier=0.5"))


def test_epsilon_of_a_run_is_its_worst_client_against_dp_accounting():
    import dp_accounting

    from privfed.privacy.calibration import run_epsilon

    plans = [(0.05, 4), (0.5, 2), (0.05, 4)]
    sigma, rounds, delta = 1.3, 10, 1e-5

    def independent(q: float, steps: int) -> float:
        accountant = dp_accounting.rdp.RdpAccountant()  # its own orders and RDP code
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(event, steps * rounds)
        return accountant.get_epsilon(delta)

    worst = max(independent(q, s) for q, s in set(plans))
    assert worst == pytest.approx(independent(0.5, 2))  # the larger q decides
    assert run_epsilon(plans, sigma, rounds, delta, method="rdp") == pytest.approx(worst, rel=1e-6)
    # pld (the default) is the tighter bound on the same worst client
    assert run_epsilon(plans, sigma, rounds, delta) < 0.95 * worst
    assert run_epsilon(plans[:1], sigma, rounds, delta) < run_epsilon(plans, sigma, rounds, delta)
