"""The per-round learning rate (a public schedule: post-processing, no privacy cost)."""

from __future__ import annotations

import pytest

from privfed.privacy.dp_sgd import local_plan, round_learning_rate

from ..helpers import run_config


def test_cosine_decays_from_the_rate_to_a_tenth():
    train = run_config("train.learning_rate=0.05").train
    rates = [round_learning_rate(train, r, 10) for r in range(1, 11)]
    assert rates[0] == pytest.approx(0.05) and rates[-1] == pytest.approx(0.005)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))


def test_constant_schedule_and_single_round():
    train = run_config("train.learning_rate=0.05", "train.lr_schedule=constant").train
    assert {round_learning_rate(train, r, 10) for r in range(1, 11)} == {0.05}
    assert round_learning_rate(run_config().train, 1, 1) == run_config().train.learning_rate


def test_local_plan_matches_the_sampling_rate_and_epochs():
    train = run_config("train.batch_size=64", "train.local_epochs=2").train
    plan = local_plan(178, train)
    assert plan.q == pytest.approx(64 / 178) and plan.steps == round(2 / (64 / 178))
    assert local_plan(50, train).q == 1.0  # a batch larger than the data: every example, every step
