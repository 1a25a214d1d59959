"""federation=deployment on loopback: a real SuperLink and two SuperNodes on 127.0.0.1, the run
submitted by `privfed` through `flwr run`, DP on; every process is stopped afterwards. The two
devices hold their own budgets (as `privfed-edge --epsilon` sets them): one roomy, one smaller
than a single round at the server's sigma costs, which that device refuses, whatever the
server's config says."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from privfed.privacy.ledger import Ledger

from .conftest import REPO, free_ports, kill_group, privfed_env, run_privfed, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextmanager
def loopback_federation(tmp_path: Path, budgets: dict[int, str]) -> Iterator[int]:
    """A SuperLink and one SuperNode per partition on 127.0.0.1, each device with its own budget
    (as `privfed-edge --epsilon` sets it) and ledger at tmp_path/device-<partition>.sqlite;
    yields the SuperLink's port. Every process is stopped on exit."""
    env = privfed_env(tmp_path)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    # flwr >= 1.41 serves the Runtime, Fleet and Control APIs over one HTTP address.
    superlink, *nodes = free_ports(1 + len(budgets))
    procs = []

    def start(*cmd: str, extra_env: dict[str, str] | None = None) -> None:
        log = open(tmp_path / f"proc{len(procs)}.log", "w")
        procs.append(
            subprocess.Popen(
                list(cmd),
                cwd=REPO,
                env={**env, **(extra_env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start(
            "flower-superlink",
            "--insecure",
            "--disable-runtime-dependency-installation",
            *("--host", "127.0.0.1", "--port", str(superlink)),
        )
        wait_port(superlink)
        for (pid, budget), port in zip(sorted(budgets.items()), nodes, strict=True):
            device = {
                "PRIVFED_DEVICE_EPSILON": budget,
                "PRIVFED_DEVICE_LEDGER": str(tmp_path / f"device-{pid}.sqlite"),
            }
            start(
                "flower-supernode",
                "--insecure",
                *("--superlink", f"127.0.0.1:{superlink}", "--host", "127.0.0.1"),
                *("--port", str(port)),
                *("--node-config", f"partition-id={pid} num-partitions={len(budgets)}"),
                extra_env=device,
            )
        yield superlink
    finally:
        for p in procs:
            kill_group(p)


def test_deployment_on_loopback_runs_two_dp_rounds(tmp_path):
    budgets = {0: "100", 1: "0.5"}  # the server's run will ask for epsilon 8
    with loopback_federation(tmp_path, budgets) as superlink:
        proc = run_privfed(
            tmp_path,
            "federation=deployment",
            f"federation.superlink=127.0.0.1:{superlink}",
            "model=tiny_bert",
            "data.max_examples=300",
            "num_rounds=2",
            # Fed-SB's fixed B and A go to each SuperNode once; it keeps them in its context
            "strategy=fed_sb",
            "strategy.init=random",
            timeout=420,
        )
        assert proc.returncode == 0, proc.stdout[-4000:]
        run = tmp_path / "run"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["clients_trained"] == 1 and r["clients_sat_out"] == 1 for r in rows)
        assert all(r["clients_device_refused"] == 1 for r in rows)  # and the metrics say why
        # round 2 carries R and the head only: both SuperNodes kept B and A from round 1 (one
        # that had not would fail the round, not sit it out)
        assert rows[1]["bytes_down"] < rows[0]["bytes_down"] / 3
        assert all(r["clients_failed"] == 0 for r in rows)
        assert 0 < rows[-1]["epsilon_max"] <= 8.0
        summary = json.loads((run / "summary.json").read_text())
        assert summary["rounds_completed"] == 2
        # ... and the run ends by saying who sat out for budget reasons (streamed from the
        # ServerApp through `flwr run --stream`)
        assert list(summary["clients_out_of_budget"]) == ["client-1"]
        assert summary["clients_out_of_budget"]["client-1"]["reason"] == "device-refused"
        assert "client-1 sat out, budget spent: its device refused" in proc.stdout
        # Device 1 refused before training: nothing in its ledger, nothing charged for it by the
        # server's, no release on its disk. Device 0 recorded exactly what it released.
        server = Ledger(run / "ledger.sqlite")
        assert Ledger(tmp_path / "device-1.sqlite").rows() == []
        assert server.events("client-1") == []
        assert Ledger(tmp_path / "device-0.sqlite").events("client-0") == server.events("client-0")
        assert len(server.events("client-0")) == 2


def test_secure_aggregation_on_a_deployment(tmp_path):
    """privacy.user.aggregation=secure over a real SuperLink and two SuperNodes: each SuperNode
    keeps its SecAgg+ secrets in its context between the round's four messages, records the
    round's event in its own ledger (its own budget, as privfed-edge sets it) and the server
    releases both rounds. An edge device accepts this user-level run (its noise is added on the
    device); it would refuse central user-level DP (tests/unit/test_against_the_server.py)."""
    with loopback_federation(tmp_path, {0: "100", 1: "100"}) as superlink:
        proc = run_privfed(
            tmp_path,
            "federation=deployment",
            f"federation.superlink=127.0.0.1:{superlink}",
            "model=tiny_bert",
            "data.max_examples=300",
            "num_rounds=2",
            "privacy=user",
            "privacy.user.epsilon=8",
            "privacy.user.clipping=client",
            "privacy.user.aggregation=secure",
            "privacy.user.secure.min_survivors=1",  # both devices counted on (of 2)
            timeout=420,
        )
        assert proc.returncode == 0, proc.stdout[-4000:]
        run = tmp_path / "run"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["secure_aborted"] for r in rows] == [0, 0]
        population = Ledger(run / "user_ledger.sqlite").events("population")
        assert [e.kind for e in population] == ["distributed_discrete_gaussian"] * 2
        for pid in (0, 1):  # each device's own ledger: the two rounds' events, as charged
            assert Ledger(tmp_path / f"device-{pid}.sqlite").events(f"client-{pid}") == population
