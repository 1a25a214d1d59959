"""User-level DP for real (Flower on Ray, tiny model): DP-FedAvg composed with record-level
DP-SGD, both guarantees reported, the population's ledger charged once per round, and no
per-device figure in the run's outputs."""

from __future__ import annotations

import json
import sqlite3

import pytest

from privfed.privacy.accountant import epsilon
from privfed.privacy.events import SampledGaussianEvent, event_from_json

from .conftest import run_privfed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_user_and_record_level_dp_together_report_both_guarantees(tmp_path, tiny_overrides):
    proc = run_privfed(
        tmp_path, *tiny_overrides, "federation.num_clients=6", "federation.clients_per_round=3",
        "num_rounds=3", "privacy=dp_sgd", "privacy.epsilon=8", "privacy.unit=user",
        "privacy.user.epsilon=5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "DP-FedAvg noise multiplier" in proc.stdout
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["privacy_unit"] == "user" and summary["rounds_completed"] == 3
    assert 0 < summary["epsilon_spent"] <= 8.0  # record level, per client, by DP-SGD
    assert 4.5 < summary["epsilon_user"] <= 5.0  # user level, calibrated to spend it all
    rate, sigma = summary["user_sampling_rate"], summary["user_noise_multiplier"]
    assert rate == 0.5

    # The population's ledger: one sampled Gaussian per round at the sampling rate, and the
    # reported epsilon is what those events compose to.
    with sqlite3.connect(run / "user_ledger.sqlite") as con:
        rows = con.execute("SELECT client_id, round, event FROM events ORDER BY round").fetchall()
    assert [(c, r) for c, r, _ in rows] == [("population", 1), ("population", 2), ("population", 3)]
    events = [event_from_json(e) for _, _, e in rows]
    assert all(e == SampledGaussianEvent(q=rate, sigma=sigma, steps=1) for e in events)
    assert summary["epsilon_user"] == pytest.approx(epsilon(events, 1e-5), rel=1e-9)

    # Nothing per device in the outputs: the counts are withheld, no training loss
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in metrics:
        assert row["clients_trained"] is None and row["bytes_up"] is None
        assert row["train_loss"] is None and "aggregation_error" not in row
    assert metrics[-1]["epsilon_user"] == summary["epsilon_user"]


@pytest.mark.parametrize(("break_mechanism", "exit_code"), [("none", 0), ("no_noise", 3)])
def test_the_user_level_audit_passes_a_correct_run_and_catches_missing_noise(
    tmp_path, tiny_overrides, break_mechanism, exit_code
):
    """Canary devices (1,000, each present with probability 1/2) against epsilon_user = 1:
    with DP-FedAvg's noise the empirical lower bound stays under it; without the noise (still
    charged as if it were there) the auditor tells present canaries from absent ones."""
    proc = run_privfed(
        tmp_path, *tiny_overrides, "federation.num_clients=4", "federation.clients_per_round=2",
        "num_rounds=3", "privacy=user", "privacy.user.epsilon=1", "audit.enabled=true",
        f"audit.break_mechanism={break_mechanism}", "telemetry.plot=false",
    )  # fmt: skip
    assert proc.returncode == exit_code, proc.stdout[-4000:]
    record = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert record["unit"] == "user" and record["audit"]["canaries"] == 1000
    assert record["epsilon_theory"] == pytest.approx(1.0, abs=2e-3)
    assert record["audit_passed"] is (exit_code == 0)
    if exit_code:
        assert record["epsilon_audit_lower"] > 2.0  # far above: a real catch, not a fluke
    # the record-level canaries are not in the clients' data in a user-level audit
    assert not list((tmp_path / "run" / "audit").glob("round_*_client_*.npz"))
