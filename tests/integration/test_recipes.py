"""Recipes through the real CLI (Flower on Ray, the tiny model): the head on cached features from
DP prototypes, full-batch DP gradient descent after them, a tuning run that never evaluates the
test split, and the two-stage recipe (prototypes, then adapters) under one budget composed in
the ledger."""

from __future__ import annotations

import json

import pytest

from privfed.privacy.accountant import epsilon
from privfed.privacy.events import GaussianEvent, SampledGaussianEvent
from privfed.privacy.ledger import Ledger

from .conftest import run_privfed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def rows_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_head_from_prototypes_then_dp_gradient_descent_with_no_test_evaluation(
    tmp_path, tiny_overrides
):
    proc = run_privfed(
        tmp_path, *tiny_overrides, "recipe=head", "recipe.prototypes=true", "num_rounds=2",
        "train.sampling=full_batch", "train.local_steps=2", "eval.test=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    run = tmp_path / "run"
    rows = rows_of(run)
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 0: the prototypes' head
    assert all(r["accuracy"] is None and r["loss"] is None for r in rows)  # never on test
    assert all(0 <= r["val_accuracy"] <= 1 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_accuracy"] is None and summary["best_accuracy"] is None
    assert summary["final_val_accuracy"] == rows[-1]["val_accuracy"]
    assert summary["recipe"] == "head" and summary["rounds_completed"] == 2
    # each client: one Gaussian release (its prototypes), then a full-batch step pair a round
    ledger = Ledger(run / "ledger.sqlite")
    sigma = summary["noise_multiplier"]
    for client in ledger.clients():
        events = ledger.events(client)
        assert isinstance(events[0], GaussianEvent)
        assert events[1:] == [SampledGaussianEvent(q=1.0, sigma=sigma, steps=2)] * 2
        assert epsilon(events, 1e-5) <= 8.0 + 1e-9
    assert summary["epsilon_spent"] == pytest.approx(
        max(epsilon(ledger.events(c), 1e-5) for c in ledger.clients()), rel=1e-6
    )


def test_the_two_stage_recipe_composes_prototypes_and_adapter_rounds_in_one_budget(
    tmp_path, tiny_overrides
):
    proc = run_privfed(
        tmp_path, *tiny_overrides, "recipe=head_then_adapters", "strategy=ffa_lora",
        "num_rounds=2", "privacy.epsilon=3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    run = tmp_path / "run"
    assert [r["round"] for r in rows_of(run)] == [0, 1, 2]
    assert all(r["accuracy"] is not None for r in rows_of(run))
    ledger = Ledger(run / "ledger.sqlite")
    for client in ledger.clients():
        events = ledger.events(client)
        assert isinstance(events[0], GaussianEvent) and len(events) == 3
        assert all(isinstance(e, SampledGaussianEvent) for e in events[1:])
        assert 2.9 < epsilon(events, 1e-5) <= 3.0 + 1e-9  # one budget, spent by both stages
