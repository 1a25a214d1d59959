"""Real federations through the CLI: Hydra -> validation -> Flower Simulation Engine on Ray ->
Opacus DP-SGD clients -> SQLite ledger -> run directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from privfed.privacy.accountant import epsilon
from privfed.privacy.events import event_from_json

from .conftest import kill_group, privfed_env, run_privfed

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ledger_rows(run_dir):
    with sqlite3.connect(run_dir / "ledger.sqlite") as con:
        return con.execute("SELECT run_id, client_id, round, name, event FROM events").fetchall()


def test_two_round_three_client_dp_simulation_writes_the_run_directory(tmp_path, tiny_overrides):
    proc = run_privfed(tmp_path, *tiny_overrides, "num_rounds=2", "privacy.epsilon=8")
    assert proc.returncode == 0, proc.stdout[-4000:]
    # Flower announces what it will remove in its own log, not as Python warnings: a default
    # run uses nothing deprecated (an upgrade would break it silently otherwise).
    assert "DEPRECATED FEATURE" not in proc.stdout, proc.stdout[-4000:]
    run = tmp_path / "run"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["num_rounds"] == 2 and cfg["privacy"]["epsilon"] == 8

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["clients_trained"] == 3 and r["clients_rejected"] == 0 and r["clients_failed"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["wall_time_s"] > 0
        assert r["noise_multiplier"] > 0
    assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"] <= 8.0

    summary = json.loads((run / "summary.json").read_text())
    for key in (
        "final_accuracy",
        "epsilon_spent",
        "epsilon_target",
        "delta",
        "rounds_completed",
        "noise_multiplier",
    ):
        assert key in summary
    assert summary["rounds_completed"] == 2 and summary["epsilon_target"] == 8.0
    assert summary["final_accuracy"] == rows[-1]["accuracy"]

    # The ledger holds exactly one event per client per round, and epsilon derives from it.
    events = ledger_rows(run)
    assert sorted((c, r) for _, c, r, _, _ in events) == [
        (f"client-{i}", r) for i in range(3) for r in (1, 2)
    ]
    for client in ("client-0", "client-1", "client-2"):
        evs = [event_from_json(e) for _, c, _, _, e in events if c == client]
        assert epsilon(evs, 1e-5) <= 8.0
    assert summary["epsilon_spent"] == pytest.approx(
        max(
            epsilon([event_from_json(e) for _, c, _, _, e in events if c == cl], 1e-5)
            for cl in ("client-0", "client-1", "client-2")
        )
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "round_0001.pt",
        "round_0002.pt",
    ]
    assert (run / "plot.png").stat().st_size > 10_000

    # What a user sees through a pipe (not a terminal): a line per start-up phase before the
    # first round, the run directory at the start and the end, an unwrapped, untruncated final
    # table, and no library noise after it.
    out = proc.stdout
    lines = out.splitlines()
    where = {
        key: next(i for i, line in enumerate(lines) if line.startswith(key))
        for key in (
            "privfed: run directory",
            "privfed: data: loading",
            "privfed: data: 3 clients",
            "privfed: model: tiny_bert",
            "privfed: privacy: noise multiplier",
            "privfed: actors: starting Ray",
            "round 1/2",
        )
    }
    assert list(where.values()) == sorted(where.values()), where  # in this order
    sigma = summary["noise_multiplier"]
    assert f"noise multiplier {sigma:.4f} for epsilon = 8, delta = 1e-05" in out
    assert [line for line in lines if line.startswith("privfed: run directory")] == [
        f"privfed: run directory: {run}",
        f"privfed: run directory: {run} (config.yaml, metrics.jsonl, summary.json, plot.png)",
    ]
    header = next(line for line in lines if "strategy" in line and "rejected" in line)
    assert "command wall" in header and "…" not in out  # one line, nothing cut
    assert "Manually terminating" not in out
    table_end = max(i for i, line in enumerate(lines) if line.startswith("└"))
    assert lines[-1].startswith("privfed: run directory") and len(lines) - table_end == 2


def test_bad_config_exits_2_with_one_line_and_starts_nothing(tmp_path):
    proc = run_privfed(tmp_path, "num_rounds=0", timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines == [
        "privfed: invalid config: num_rounds: must be >= 1 (0 only for a prototypes-only head)"
    ]
    assert not (tmp_path / "run").exists()


def test_a_killed_run_resumes_from_its_last_round_with_the_same_ledger(tmp_path, tiny_overrides):
    """With Fed-SB, whose charged svd init (round 0) must not be repeated by the resume either."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "privfed.cli",
        f"hydra.run.dir={run}",
        *tiny_overrides,
        "num_rounds=3",
        "strategy=fed_sb",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=privfed_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "round_0001.pt").exists():
            assert proc.poll() is None, "run ended before round 1 finished"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        kill_group(proc)  # kill -9 the run and its Ray processes mid-flight
    assert not (run / "summary.json").exists()
    before = ledger_rows(run)
    assert {r for _, _, r, _, _ in before} <= {0, 1, 2}

    resumed = run_privfed(tmp_path / "resume", f"resume={run}")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    events = ledger_rows(run)
    keys = [(c, r) for _, c, r, _, _ in events]
    assert sorted(keys) == [
        (f"client-{i}", r) for i in range(3) for r in (0, 1, 2, 3)
    ]  # no double count, and the init (round 0) charged once
    assert len({run_id for run_id, *_ in events}) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["epsilon_spent"] <= 8.0


def test_crashing_and_malformed_clients_are_counted_and_the_rounds_go_on(tmp_path, tiny_overrides):
    overrides = [o for o in tiny_overrides if not o.startswith("federation.num_clients")]
    proc = run_privfed(
        tmp_path,
        *overrides,
        "federation.num_clients=4",
        "num_rounds=2",
        "strategy._target_=tests.faults.FaultyClientsLora",
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    # client 0 crashes and client 2 (an extra tensor) is stopped by its own reply check: both
    # fail; client 1's NaN reaches the server, which rejects it; client 3 trains
    for r in rows:
        assert (r["clients_trained"], r["clients_rejected"], r["clients_failed"]) == (1, 1, 2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["clients_rejected_total"] == 2 and summary["clients_failed_total"] == 4


def test_multirun_sweep_writes_one_run_directory_per_epsilon(tmp_path, tiny_overrides):
    proc = run_privfed(
        tmp_path, *tiny_overrides, "num_rounds=1", "privacy.epsilon=2,8", timeout=400, multirun=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    sweep = tmp_path / "sweep"
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["epsilon_target"] for s in summaries] == [2.0, 8.0]
    assert summaries[0]["noise_multiplier"] > summaries[1]["noise_multiplier"]
    assert all(s["epsilon_spent"] <= s["epsilon_target"] for s in summaries)


def test_fed_sb_fedmentor_and_rqm_run_end_to_end_next_to_lora(tmp_path, tiny_overrides):
    """One Hydra multirun through the real CLI: Fed-SB's charged svd init, FedMentor's
    per-domain metrics and budgets, and RQM's smaller upload, against plain LoRA."""
    import sqlite3

    names = ["lora", "fed_sb", "fedmentor", "rqm"]
    proc = run_privfed(
        tmp_path,
        *tiny_overrides,
        "num_rounds=2",
        f"strategy={','.join(names)}",
        timeout=500,
        multirun=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    runs = {n: tmp_path / "sweep" / str(i) for i, n in enumerate(names)}
    summaries = {n: json.loads((d / "summary.json").read_text()) for n, d in runs.items()}
    rows = {
        n: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for n, d in runs.items()
    }
    for n, s in summaries.items():
        assert s["strategy"] == n and s["rounds_completed"] == 2
        assert 0 < s["epsilon_spent"] <= s["epsilon_target"] == 8.0
        assert s["clients_rejected_total"] == s["clients_failed_total"] == 0

    with sqlite3.connect(runs["fed_sb"] / "ledger.sqlite") as con:
        init = con.execute("SELECT event FROM events WHERE round = 0").fetchall()
    assert len(init) == 3 and all('"gaussian"' in e for (e,) in init)  # one charged init each
    assert all(r["aggregation_error"] < 1e-9 for r in rows["fed_sb"])
    assert rows["lora"][0]["aggregation_error"] > 1e-3
    # Fed-SB's fixed B and A reach each node once (here 16,384 of 20,805 numbers): from round 2
    # the broadcast is R and the head, and every node still trains on the whole state
    sb_down = [r["bytes_down"] for r in rows["fed_sb"]]
    assert sb_down[1] < sb_down[0] / 3, sb_down
    assert all(r["clients_trained"] == 3 for r in rows["fed_sb"])
    # lora leaves nothing out (round 1 is smaller: Flower sends identical arrays once per
    # message, and every B starts at zero)
    lora_down = [r["bytes_down"] for r in rows["lora"]]
    assert lora_down[1] >= lora_down[0], lora_down

    last = rows["fedmentor"][-1]
    for d in ("high", "medium", "low"):
        assert last[f"domain/{d}/epsilon"] <= last[f"domain/{d}/epsilon_budget"]
        assert 0.0 <= last[f"domain/{d}/utility"] <= 1.0
    assert rows["fedmentor"][0]["domain/high/sigma"] > rows["fedmentor"][0]["domain/low/sigma"]
    # the summary names each domain's own target and sigma, not only the largest target
    mentor = summaries["fedmentor"]
    assert mentor["epsilon_target_by_domain"] == {"high": 8.0, "low": 8.0, "medium": 8.0}
    by_domain = mentor["noise_multiplier_by_domain"]
    assert by_domain["high"] > by_domain["medium"] > by_domain["low"]

    assert all(r["bits_per_coordinate"] == 4.0 for r in rows["rqm"])
    assert rows["rqm"][-1]["bytes_up"] < rows["lora"][-1]["bytes_up"]
    for n in names:  # three replies per round: the per-client figure is a third of the total
        r = rows[n][-1]
        assert r["bytes_up_per_client"] == pytest.approx(r["bytes_up"] / 3)
        assert summaries[n]["bytes_up_per_client_round"] > 0


def test_clients_bundled_into_one_actor_call_release_what_they_release_one_call_each(
    tmp_path, tiny_overrides
):
    """federation.messages_per_call: several clients run in turn in one Ray call (Flower's
    engine otherwise makes one call per client). A fully seeded non-private run is the same to
    the last bit either way: every client's reply, so the aggregate, the accuracy and the
    saved state; and the bundled run did make fewer calls than messages."""
    overrides = [o for o in tiny_overrides if not o.startswith("federation.num_clients")]
    common = [*overrides, "federation.num_clients=8", "num_rounds=2", "privacy=none"]
    alone = run_privfed(tmp_path / "alone", *common, "federation.messages_per_call=1")
    bundled = run_privfed(tmp_path / "bundled", *common, "federation.messages_per_call=4")
    for proc in (alone, bundled):
        assert proc.returncode == 0, proc.stdout[-4000:]
    assert "actor calls" not in alone.stdout
    calls = [line for line in bundled.stdout.splitlines() if "actor calls" in line]
    assert calls and "16 client messages in" in calls[0], bundled.stdout[-2000:]
    assert int(calls[0].split(" in ")[1].split()[0]) < 16

    def rows(name: str) -> list[dict]:
        text = (tmp_path / name / "run" / "metrics.jsonl").read_text()
        keep = ("accuracy", "loss", "val_accuracy", "clients_trained", "bytes_up")
        return [{k: json.loads(line)[k] for k in keep} for line in text.splitlines()]

    assert rows("alone") == rows("bundled")
    import torch

    def state(name: str) -> dict:
        path = tmp_path / name / "run" / "checkpoints" / "round_0002.pt"
        return torch.load(path, weights_only=False)["global_state"]  # our own file

    first, second = state("alone"), state("bundled")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
