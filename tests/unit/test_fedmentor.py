"""FedMentor: the per-domain sigma rule, calibration against each domain's budget, the
utility-driven lowering that the accountant must allow, and a client using its domain's sigma."""

from __future__ import annotations

import json

import pytest
import torch

from privfed import keys
from privfed.client.app import train_round
from privfed.privacy.accountant import epsilon
from privfed.privacy.events import SampledGaussianEvent
from privfed.strategies.fedmentor import (
    DOMAIN_SIGMAS,
    FedMentor,
    client_domains,
    domain_sigmas,
    lowered_sigma,
)
from privfed.strategies.registry import build_strategy, supporting

from ..helpers import TINY, compose_raw, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_sigma_rule_scales_the_least_sensitive_domains_sigma_and_raises_where_needed():
    sens = {"high": 1.5, "medium": 1.0, "low": 0.5}
    budgets = {"high": 8.0, "medium": 0.5, "low": 4.0}
    # A toy accountant: epsilon = 10 / sigma for every domain.
    sigma_base, sigmas = domain_sigmas(
        sens, budgets, lambda d, s: 10.0 / s, lambda d, eps: 10.0 / eps
    )
    assert sigma_base == pytest.approx(2.5 / 0.5)  # low: 10 / 4 = 2.5 at s = 0.5
    assert sigmas["low"] == pytest.approx(2.5)
    assert sigmas["high"] == pytest.approx(7.5)  # 1.5 * 5, meets 8 (10 / 7.5 = 1.33)
    assert sigmas["medium"] == pytest.approx(20.0)  # 5 would spend 2 > 0.5: raised to 10 / 0.5


def test_lowering_decisions():
    def yes(_):
        return True

    def no(_):
        return False

    assert lowered_sigma(2.0, 0.9, 0.8, 0.9, 0.3, yes) == (2.0, "kept")
    assert lowered_sigma(2.0, 0.5, 0.8, 0.9, 0.3, yes) == (pytest.approx(1.8), "lowered")
    assert lowered_sigma(2.0, 0.5, 0.8, 0.9, 0.3, no) == (2.0, "budget")
    assert lowered_sigma(0.3, 0.5, 0.8, 0.9, 0.3, yes) == (0.3, "at_min")
    assert lowered_sigma(0.32, 0.5, 0.8, 0.9, 0.3, yes) == (pytest.approx(0.3), "lowered")


def test_calibration_meets_every_domain_budget_and_is_tight_on_the_least_sensitive():
    cfg = run_config(
        *TINY,
        "strategy=fedmentor",
        "federation.num_clients=6",
        "strategy.domains.medium.epsilon=2",
    )
    from privfed.data.federated import federated_data
    from privfed.privacy.dp_sgd import local_plan

    strategy = FedMentor(cfg)
    data = federated_data(cfg)
    sizes = data.sizes()
    strategy.calibrate_noise(data, strategy.new_model(data))
    doms = client_domains(strategy.settings, cfg.federation.num_clients)
    assert doms == ["high", "medium", "low"] * 2
    assert strategy.sigmas["high"] > strategy.sigmas["low"]
    for i, d in enumerate(doms):
        plan = local_plan(sizes[i], cfg.train)
        ev = SampledGaussianEvent(plan.q, strategy.sigmas[d], plan.steps * cfg.num_rounds)
        assert epsilon([ev], 1e-5) <= strategy.domain_budget(d)
        assert strategy.client_budget(i) == strategy.domain_budget(d)
    # the least sensitive domain's sigma is (to 0.1%) the smallest that meets its budget
    low = [i for i, d in enumerate(doms) if d == "low"]
    worst = max(
        epsilon(
            [SampledGaussianEvent(lp.q, strategy.sigmas["low"] / 1.002, lp.steps * cfg.num_rounds)],
            1e-5,
        )
        for lp in (local_plan(sizes[i], cfg.train) for i in low)
    )
    assert worst > strategy.domain_budget("low")
    assert strategy.sigma_base == pytest.approx(strategy.sigmas["low"] / 0.7)


def test_lowering_happens_only_when_the_accountant_allows_it():
    cfg = run_config(*TINY, "strategy=fedmentor", "num_rounds=4")
    from privfed.data.federated import federated_data

    strategy = FedMentor(cfg)
    data = federated_data(cfg)
    strategy.calibrate_noise(data, strategy.new_model(data))
    before = dict(strategy.sigmas)
    plans = strategy.plans

    def events_after_round_1(i):
        q, s = plans[i]
        return [SampledGaussianEvent(q, before[strategy.client_domain[i]], s)]

    # utility 0 everywhere: every domain wants less noise; after 1 of 4 rounds there is room,
    # except for the least sensitive domain whose sigma was calibrated to its budget exactly.
    metrics = strategy.end_round(1, lambda labels: 0.0, events_after_round_1)
    assert metrics["domain/high/decision"] == "lowered"
    assert strategy.sigmas["high"] == pytest.approx(0.9 * before["high"])
    assert metrics["domain/low/decision"] == "budget"
    assert strategy.sigmas["low"] == before["low"]
    for d in ("high", "medium", "low"):
        assert metrics[f"domain/{d}/sigma"] == before[d]
        assert metrics[f"domain/{d}/utility"] == 0.0
        assert 0 < metrics[f"domain/{d}/epsilon"] <= metrics[f"domain/{d}/epsilon_budget"]
    # utility above the threshold: noise stays
    metrics = strategy.end_round(2, lambda labels: 0.95, events_after_round_1)
    assert {metrics[f"domain/{d}/decision"] for d in ("high", "medium", "low")} == {"kept"}


def test_a_client_trains_with_its_domains_sigma(tmp_path):
    from privfed.privacy.ledger import Ledger

    cfg = run_config(*TINY, "strategy=fedmentor", "train.batch_size=16")
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    msg.content.config_records[keys.CONFIG][DOMAIN_SIGMAS] = json.dumps(
        {"high": 2.5, "medium": 1.5, "low": 1.0}
    )
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", 100.0, 1e-5)
    train_round(cfg, msg, context)
    (event,) = Ledger(tmp_path / "ledger.sqlite").events("client-0")
    assert event.sigma == 2.5  # partition 0 is in domain "high" (round-robin)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("strategy.client_domains=[high,medium,nowhere]",), "unknown domain 'nowhere'"),
        (("strategy.client_domains=[high,medium]",), "strategy.client_domains"),
        (("strategy.domains.high.sensitivity=0",), "strategy.domains.high.sensitivity"),
        (("strategy.domains.low.labels=[weather]",), "strategy.domains.low.labels"),
        (("strategy.gamma=1.5",), "strategy.gamma"),
        (("strategy.base=rqm",), "strategy.base: 'rqm' cannot carry .* not plain DP-SGD"),
        (("strategy.base=fed_sb",), "strategy.base: 'fed_sb' cannot carry"),
        (("strategy.base=fedmentor",), "strategy.base: 'fedmentor' cannot carry"),
        (("strategy.base=nope",), "strategy.base: 'nope' .* not a registered strategy"),
        (("strategy.base=fedsvd", "recipe=head"), "strategy.base: fedsvd aggregates LoRA"),
    ],
)
def test_bad_fedmentor_parameters_fail_before_start(overrides, key):
    from privfed.cli import prepare
    from privfed.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        prepare(compose_raw(*TINY, "strategy=fedmentor", *overrides))


@pytest.mark.parametrize("base", supporting("noise_policy_base"))
def test_fedmentor_is_a_noise_policy_over_any_base_that_supports_one(base):
    """What trains, travels and aggregates is the base's, with the base's own settings (its
    YAML); FedMentor adds its domains' sigmas to the round config."""
    from privfed.strategies.registry import STRATEGIES

    cfg = run_config(*TINY, "strategy=fedmentor", f"strategy.base={base}")
    mentor = build_strategy(cfg)
    alone = build_strategy(run_config(*TINY, f"strategy={base}"))
    assert isinstance(mentor.base, STRATEGIES[base])  # type: ignore[attr-defined]
    assert mentor.base.settings == alone.settings  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    names = ["m.lora_A.default.weight", "m.lora_B.default.weight", "classifier.weight"]
    shapes = [(4, 8), (8, 4), (3, 8)]
    state = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes, strict=True)}
    assert [mentor.trainable(n) for n in names] == [alone.trainable(n) for n in names]
    assert [mentor.fixed(n) for n in names] == [alone.fixed(n) for n in names]
    payloads = [
        {
            n: t + torch.randn(t.shape, generator=g)
            for n, t in alone.client_payload(state, state).items()
        }
        for _ in range(3)
    ]
    for step in range(2):  # FedSVD re-factors on its own schedule: the same state both ways
        ours = mentor.aggregate(state, payloads, [1.0, 2.0, 3.0])
        theirs = alone.aggregate(state, payloads, [1.0, 2.0, 3.0])
        assert set(ours) == set(theirs), step
        for n in ours:
            torch.testing.assert_close(ours[n], theirs[n], rtol=0, atol=0)
    assert mentor.state_dict()["base"] == alone.state_dict()
