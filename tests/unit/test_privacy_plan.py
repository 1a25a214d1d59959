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
    data = federated_data(cfg)
    model = reference.new_model(data)
    reference.calibrate_noise(data, model)
    # The server (and a resumed or deployed ServerApp) builds its strategy from the config that
    # travels: it gets the same sigma without searching for it.
    monkeypatch.setattr(calibration, "calibrate_dp_sgd", _no_search)
    monkeypatch.setattr("privfed.strategies.fedmentor.calibrate_dp_sgd", _no_search)
    server = build_strategy(cfg)
    assert server.calibrate_noise(data, model) == sigma
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
    server, data = build_strategy(tampered), federated_data(cfg)
    with pytest.raises(BudgetUnreachableError, match="more than the budget"):
        server.calibrate_noise(data, server.new_model(data))


@pytest.mark.parametrize("planned", ["planned_noise_multiplier", "planned_user_noise_multiplier"])
def test_the_planned_sigmas_are_not_settings(planned):
    from privfed.cli import prepare

    with pytest.raises(ConfigError, match=f"{planned}: set by privfed"):
        prepare(compose_raw(*TINY, f"+{planned}=0.5"))


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


USER = ("privacy=user", "federation.clients_per_round=2", "privacy.user.epsilon=4")


def test_the_user_level_sigma_is_calibrated_once_and_travels_too(monkeypatch):
    from privfed.cli import prepare_run

    prepared = prepare_run(compose_raw(*TINY, *USER))
    cfg = prepared.cfg
    user_sigma = cfg.planned_user_noise_multiplier
    assert user_sigma is not None and user_sigma == prepared.user_sigma > 0
    assert prepared.strategy.cfg is cfg  # the strategy the server plays holds the plan
    # a deployed server builds its strategy from the config that travels: no second search
    monkeypatch.setattr(calibration, "calibrate_sigma", _no_search)
    assert build_strategy(cfg).user_dp.sigma == user_sigma  # type: ignore[union-attr]
    # and a carried sigma too small for the user's budget is refused where it is used
    tampered = cfg.model_copy(update={"planned_user_noise_multiplier": user_sigma * 0.9})
    with pytest.raises(BudgetUnreachableError, match="the planned user sigma: .* more than"):
        _ = build_strategy(tampered).user_dp.sigma  # type: ignore[union-attr]


def test_a_simulation_plays_the_run_it_prepared_and_prepares_nothing_again(tmp_path, monkeypatch):
    from privfed.cli import prepare_run
    from privfed.server import loop
    from privfed.telemetry.run_dir import RunDirectory

    prepared = prepare_run(compose_raw(*TINY, "strategy=fedmentor"))

    def _prepare_again(*args, **kwargs):
        raise AssertionError("the server prepared the run a second time")

    monkeypatch.setattr(loop, "prepare_run", _prepare_again)
    run = loop.Federation(None, prepared.cfg, RunDirectory(tmp_path), prepared)  # type: ignore[arg-type]
    assert run.strategy is prepared.strategy and run.data is prepared.data
    assert run.sigma == prepared.sigma == prepared.cfg.planned_noise_multiplier
    assert run.strategy.sigmas  # type: ignore[attr-defined]  # FedMentor's plan, made once
    # without a prepared run (a deployed ServerApp) the server prepares it from the config
    with pytest.raises(AssertionError, match="a second time"):
        loop.Federation(None, prepared.cfg, RunDirectory(tmp_path / "b"))  # type: ignore[arg-type]


def test_an_audit_check_leaves_the_prepared_model_as_the_server_plays_it():
    """The audit's check before start reads which coordinates DP-SGD trains; the prepared
    model is the server's (its initial state is every adapter tensor), so the check must not
    freeze FFA-LoRA's A in it."""
    from privfed.cli import prepare_run
    from privfed.models.backbone import adapter_names

    prepared = prepare_run(compose_raw(*TINY, "strategy=ffa_lora", "audit.enabled=true"))
    names = adapter_names(prepared.model)
    assert any(".lora_A." in n for n in names)  # A is broadcast, though nobody trains it
    assert set(prepared.strategy.init_state(prepared.model, names)) == set(names)
