"""User-level DP for real (Flower on Ray, tiny model): DP-FedAvg composed with record-level
DP-SGD, both guarantees reported, the population's ledger charged once per round, and nothing
the server side writes depends on which devices were sampled."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from privfed.privacy.accountant import epsilon
from privfed.privacy.events import SampledGaussianEvent, event_from_json
from privfed.privacy.ledger import Ledger

from .conftest import run_privfed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# DP-FedAvg composed with record-level DP-SGD, on FFA-LoRA (whose fixed A goes to a device once:
# the bytes per device would count the new ones).
USER_RUN = (
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "num_rounds=3",
    "privacy=dp_sgd",
    "privacy.epsilon=8",
    "privacy.unit=user",
    "privacy.user.epsilon=5",
    "strategy=ffa_lora",
)
NOISED = {  # computed from the noised release
    "accuracy",
    "loss",
    "final_accuracy",
    "final_loss",
    "best_accuracy",
    "val_accuracy",
    "val_loss",
    "final_val_accuracy",
    "best_val_accuracy",
}
MACHINE = {"wall_time_s", "train_time_s", "memory_rss_mb"}  # the machine's: README, not covered


def sampled(run: Path) -> set[tuple[str, int]]:
    """(device, round) of every release, from the devices' own ledgers (their storage)."""
    out = set()
    for db in Path(f"{run}.devices").glob("client-*/device-ledger.sqlite"):
        with sqlite3.connect(db) as con:
            out |= set(con.execute("SELECT client_id, round FROM events").fetchall())
    return out


def test_a_user_level_run_says_nothing_of_who_was_sampled(tmp_path, tiny_overrides):
    """Two runs of one config whose secret samples differ: everything the server side writes
    (metrics, summary, both ledgers, checkpoints, its console) is the same but the values
    computed from the noised release and the machine's timings. Each device keeps its own
    record-level ledger and releases in its own storage (``<run>.devices``)."""
    cache = {"PRIVFED_CACHE": str(tmp_path / "cache")}
    outs = {}
    for name in ("a", "b"):
        proc = run_privfed(tmp_path / name, *tiny_overrides, *USER_RUN, extra_env=cache)
        assert proc.returncode == 0, proc.stdout[-4000:]
        outs[name] = proc.stdout
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert sampled(a) and sampled(b) and sampled(a) != sampled(b)  # the samples differ

    rows = {
        r: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)
    }
    for ra, rb in zip(rows[a], rows[b], strict=True):
        assert set(ra) == set(rb)
        assert {k for k in ra if ra[k] != rb[k]} <= NOISED | MACHINE, (ra, rb)
        assert ra["clients_trained"] is None and ra["bytes_up_per_client"] is None
        assert ra["epsilon_max"] is None and ra["train_loss"] is None
    summary = {r: json.loads((r / "summary.json").read_text()) for r in (a, b)}
    diff = {k for k in summary[a] if summary[a][k] != summary[b][k]}
    assert diff <= NOISED | MACHINE | {"run_id"}, diff
    assert (a / "config.yaml").read_text() == (b / "config.yaml").read_text()
    for run in (a, b):
        assert Ledger(run / "ledger.sqlite").rows() == []  # no device reports to the server
    population = {}
    for run in (a, b):
        with sqlite3.connect(run / "user_ledger.sqlite") as con:
            population[run] = con.execute(
                "SELECT round, event FROM events ORDER BY round"
            ).fetchall()
    assert population[a] == population[b]
    for name in sorted(p.name for p in (a / "checkpoints").iterdir()):
        ca, cb = (torch.load(r / "checkpoints" / name, weights_only=False) for r in (a, b))
        assert set(ca) == set(cb) and "rng" not in ca
        assert ca["ledger"] == cb["ledger"] == []
        for k in ("round", "noise_multiplier", "user_clip_norm", "strategy_state"):
            assert ca[k] == cb[k], k
        assert {n: t.shape for n, t in ca["global_state"].items()} == {
            n: t.shape for n, t in cb["global_state"].items()
        }
    for out in outs.values():  # the server's console: no device named, none counted
        assert "client-" not in out and "clients withheld (user-level DP)" in out

    # Both guarantees, reported: user level spent by the population's ledger, one sampled
    # Gaussian per round; record level as its public bound (each device keeps its own).
    s = summary[a]
    assert s["privacy_unit"] == "user" and s["rounds_completed"] == 3
    assert s["epsilon_spent"] is None and s["clients_out_of_budget"] is None
    assert 7.0 < s["epsilon_record_bound"] <= 8.0
    assert 4.5 < s["epsilon_user"] <= 5.0  # user level, calibrated to spend it all
    rate, sigma = s["user_sampling_rate"], s["user_noise_multiplier"]
    assert rate == 0.5
    events = [event_from_json(e) for _, e in population[a]]
    assert [r for r, _ in population[a]] == [1, 2, 3]
    assert all(e == SampledGaussianEvent(q=rate, sigma=sigma, steps=1) for e in events)
    assert s["epsilon_user"] == pytest.approx(epsilon(events, 1e-5), rel=1e-9)
    assert rows[a][-1]["epsilon_user"] == s["epsilon_user"]
    # each device spent only what its own ledger holds: at most the public bound
    for db in Path(f"{a}.devices").glob("client-*/device-ledger.sqlite"):
        device = Ledger(db)
        assert 0 < device.spent(db.parent.name) <= s["epsilon_record_bound"] + 1e-9


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


def test_secure_aggregation_on_the_simulation_engine(tmp_path, tiny_overrides):
    """privacy.user.aggregation=secure on Flower's Simulation Engine (Ray actors, one node's
    context kept between the round's four messages): the run completes, each round releases,
    the population's ledger and every sampled device's own ledger hold the distributed discrete
    Gaussian, and epsilon per user stays within the budget."""
    proc = run_privfed(
        tmp_path,
        *tiny_overrides,
        "federation.num_clients=6",
        "federation.clients_per_round=6",
        "num_rounds=2",
        "privacy=user",
        "privacy.user.epsilon=5",
        "privacy.user.clipping=client",
        "privacy.user.aggregation=secure",
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["secure_aborted"] for r in rows] == [0, 0]
    s = json.loads((run / "summary.json").read_text())
    assert 4.0 < s["epsilon_user"] <= 5.0
    with sqlite3.connect(run / "user_ledger.sqlite") as con:
        population = [event_from_json(e) for (e,) in con.execute("SELECT event FROM events")]
    assert [e.kind for e in population] == ["distributed_discrete_gaussian"] * 2
    for i in range(6):
        device = Ledger(Path(f"{run}.devices") / f"client-{i}" / "device-ledger.sqlite")
        events = device.events(f"client-{i}/user")
        assert events == population  # the device recorded what the population was charged
    assert "secure aggregation" in proc.stdout
