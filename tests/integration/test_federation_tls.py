"""The compose topology, started directly on 127.0.0.1 (no Docker engine here): a SuperLink with
TLS and Flower's node authentication, SuperNodes started with `privfed-edge`, the accountant
service, and Prometheus (from the Debian package, where present). Every process is killed after.

* 2 DP rounds through `flwr run` (submitted by `privfed`): the run directory, the service's
  ledger, Prometheus' scrapes; a SuperNode whose key is not registered is refused.
* A SuperNode killed mid-round: the round completes with the other, the next goes on without
  it, and after a restart it rejoins.
* A server that ships a bundle with the device budget switched off is refused by every device;
  the approved bundle trains (and enforces that budget).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest

from privfed import app_bundle
from privfed.privacy.ledger import Ledger
from privfed.privacy.service.auth import add_token
from privfed.privacy.service.client import AccountantClient

from .conftest import REPO, free_ports, kill_group, privfed_env, run_privfed, wait_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["model=tiny_bert", "data.max_examples=300"]


class Topology:
    """Processes of one federation on loopback; ``close()`` kills them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, {}
        self.env = privfed_env(tmp)
        self.env.update(
            FLWR_HOME=str(tmp / "flwr-home"),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
        )
        self.certs = tmp / "certs"
        subprocess.run(
            ["bash", str(REPO / "deploy/certs.sh"), str(self.certs), "3"], check=True, env=self.env
        )
        self.superlink_port, *self.node_ports = free_ports(4)

    def start(self, name: str, *cmd: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(
            list(cmd),
            cwd=REPO,
            env=env or self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def superlink(self, extra_env: dict | None = None) -> None:
        c = self.certs
        self.start(
            "superlink",
            "flower-superlink",
            f"--ssl-ca-certfile={c / 'ca.crt'}",
            f"--ssl-certfile={c / 'server.pem'}",
            f"--ssl-keyfile={c / 'server.key'}",
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host=127.0.0.1",
            f"--port={self.superlink_port}",
            f"--database={self.tmp / 'superlink.db'}",
            env={**self.env, **(extra_env or {})},
        )
        wait_port(self.superlink_port)
        subprocess.run(
            [
                "bash",
                str(REPO / "deploy/register.sh"),
                f"127.0.0.1:{self.superlink_port}",
                str(c / "ca.crt"),
                str(c / "node-0.pub"),
                str(c / "node-1.pub"),
            ],
            check=True,
            env={**self.env, "FLWR_HOME": str(self.tmp / "register-home")},
            timeout=120,
        )

    def node(
        self,
        i: int,
        token_file: Path | None = None,
        key: str | None = None,
        slot: int | None = None,
        epsilon: float = 100,  # the device's own budget: roomy enough for these runs
    ) -> subprocess.Popen:
        """SuperNode for partition ``i`` (of 2) with key ``node-<i>`` unless ``key`` is given;
        it approves the bundle of the privfed installed here."""
        key = key or f"node-{i}"
        slot = i if slot is None else slot
        cmd = [
            sys.executable,
            "-m",
            "privfed.edge",
            f"--superlink=127.0.0.1:{self.superlink_port}",
            f"--root-certificates={self.certs / 'ca.crt'}",
            f"--auth-key={self.certs / key}",
            f"--partition-id={i}",
            "--num-partitions=2",
            f"--data-dir={self.tmp / f'device-{slot}'}",
            f"--port={self.node_ports[slot]}",
            f"--epsilon={epsilon}",
            "--approve-installed",
        ]
        if token_file is not None:
            cmd.append(f"--accountant-token-file={token_file}")
        return self.start(key, *cmd)

    def federation_overrides(self) -> list[str]:
        return [
            "federation=deployment",
            f"federation.superlink=127.0.0.1:{self.superlink_port}",
            "federation.insecure=false",
            f"federation.root_certificates={self.certs / 'ca.crt'}",
        ]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                kill_group(proc)


def prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def test_tls_federation_with_node_auth_reports_to_the_accountant_and_is_scraped(tmp_path):
    topo = Topology(tmp_path)
    try:
        accountant_port, metrics_port, prometheus_port = free_ports(3)
        tokens = tmp_path / "tokens.json"
        operator = add_token(tokens, "operator", None)
        for i in (0, 1):
            (tmp_path / f"token-{i}").write_text(add_token(tokens, "client", f"client-{i}"))
        topo.start(
            "accountant",
            "privfed-accountant",
            "serve",
            f"--port={accountant_port}",
            f"--db={tmp_path / 'ledger.sqlite'}",
            f"--tokens-file={tokens}",
        )
        wait_port(accountant_port)
        server_env = {"PRIVFED_ACCOUNTANT_OPERATOR_TOKEN": operator}
        topo.superlink(server_env)  # the ServerApp runs as its subprocess
        for i in (0, 1):
            topo.node(i, tmp_path / f"token-{i}")

        # A SuperNode whose key was never registered is refused.
        intruder = topo.node(1, key="node-2", slot=2)  # a valid partition, an unknown key
        assert intruder.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in topo.log("node-2")

        promtool = shutil.which("promtool")
        prometheus = shutil.which("prometheus")
        if not prometheus:
            warnings.warn("no prometheus (Debian package): scrape checks skipped", stacklevel=1)
        else:
            config = tmp_path / "prometheus.yml"
            config.write_text(
                (REPO / "deploy/prometheus/prometheus.yml")
                .read_text()
                .replace("scrape_interval: 5s", "scrape_interval: 1s")
                .replace("accountant:8765", f"127.0.0.1:{accountant_port}")
                .replace("superlink:9100", f"127.0.0.1:{metrics_port}")
            )
            if promtool:
                subprocess.run([promtool, "check", "config", str(config)], check=True)
            topo.start(
                "prometheus",
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            )

        proc = run_privfed(
            tmp_path,
            *topo.federation_overrides(),
            *TINY,
            "num_rounds=2",
            "privacy.epsilon=8",
            "privacy.accountant.backend=http",
            f"privacy.accountant.url=http://127.0.0.1:{accountant_port}",
            f"telemetry.prometheus_port={metrics_port}",
            timeout=480,
            extra_env=server_env,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + topo.log("superlink")[-3000:]
        run = tmp_path / "run"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["clients_trained"] == 2 and r["clients_failed"] == 0 for r in rows)
        summary = json.loads((run / "summary.json").read_text())

        # The service's ledger: one DP-SGD event per client per round, epsilon as reported.
        with AccountantClient(f"http://127.0.0.1:{accountant_port}", operator) as admin:
            assert admin.clients() == ["client-0", "client-1"]
            rows_by_client = {c: len(admin.events(c)) for c in admin.clients()}
            spent = max(admin.spent(c) for c in admin.clients())
        assert rows_by_client == {"client-0": 2, "client-1": 2}
        assert spent == pytest.approx(summary["epsilon_spent"], rel=1e-9)
        assert 0 < spent <= 8.0
        # Releases stay on each device's own disk, and each device's own ledger (its budget,
        # the guarantee) holds exactly what it released.
        assert list((tmp_path / "device-0" / "releases").rglob("round_00002_*.pt"))
        for i in range(2):
            device = Ledger(tmp_path / f"device-{i}" / "device-ledger.sqlite")
            assert device.budget(f"client-{i}") == (100.0, 1e-5)
            assert len(device.events(f"client-{i}")) == 2

        if prometheus:
            deadline = time.monotonic() + 30
            recorded: list = []
            while time.monotonic() < deadline and not recorded:
                recorded = prometheus_query(
                    prometheus_port, 'privfed_accountant_reports_total{outcome="recorded"}'
                )
                time.sleep(1)
            assert recorded and float(recorded[0]["value"][1]) == 4.0  # 2 clients x 2 rounds
            server_up = prometheus_query(
                prometheus_port, 'max_over_time(up{job="privfed-server"}[10m])'
            )
            assert server_up and float(server_up[0]["value"][1]) == 1.0
            rounds = prometheus_query(prometheus_port, "max_over_time(privfed_round[10m])")
            assert rounds and float(rounds[0]["value"][1]) >= 1.0
    finally:
        topo.close()


def test_a_supernode_killed_mid_round_is_dropped_and_rejoins(tmp_path):
    topo = Topology(tmp_path)
    try:
        topo.superlink()
        for i in (0, 1):
            topo.node(i)
        metrics = tmp_path / "run" / "metrics.jsonl"

        def rounds_done() -> int:
            return len(metrics.read_text().splitlines()) if metrics.exists() else 0

        def wait_rounds(n: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while rounds_done() < n:
                assert time.monotonic() < deadline, f"round {n} did not finish"
                assert run.poll() is None or rounds_done() >= n, run.stdout.read()[-3000:]
                time.sleep(0.5)

        cmd = [
            sys.executable,
            "-m",
            "privfed.cli",
            f"hydra.run.dir={tmp_path / 'run'}",
            *topo.federation_overrides(),
            *TINY,
            "num_rounds=5",
            "federation.round_timeout_s=120",
        ]
        run = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=topo.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        topo.procs["privfed"] = run
        wait_rounds(1, 300)
        time.sleep(3)  # round 2 is under way: its messages are out
        kill_group(topo.procs["node-0"])
        wait_rounds(2, 300)
        topo.node(0)  # the same key: it rejoins as the same node
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-4000:]
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
        assert rows[0]["clients_trained"] == 2
        # The round in flight completes with the surviving node; the dead one counts as failed.
        assert rows[1]["clients_trained"] == 1 and rows[1]["clients_failed"] == 1
        # The next round goes on without it ...
        assert rows[2]["clients_sampled"] == 1 and rows[2]["clients_trained"] == 1
        # ... and after the restart it is back.
        assert any(r["clients_trained"] == 2 for r in rows[3:]), rows
    finally:
        topo.close()


def test_a_device_runs_only_the_bundle_its_owner_approved(tmp_path):
    """The attack: a server whose privfed has the device budget switched off (``from_env``
    returns None, so the device never checks its own budget) submits its bundle. Every device
    refuses it before anything of its data is read. The approved bundle then trains on the
    roomy device and, being the device's approved code, enforces the small device's budget."""
    topo = Topology(tmp_path)
    evil = tmp_path / "evil-server"
    shutil.copytree(
        app_bundle.package_dir(),
        evil / "privfed",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    device_py = evil / "privfed" / "client" / "device.py"
    source = device_py.read_text()
    anchor = "        raw = os.environ.get(EPSILON_ENV)\n"
    assert anchor in source
    device_py.write_text(source.replace(anchor, "        return None\n" + anchor, 1))
    try:
        topo.superlink()
        topo.node(0)
        topo.node(1, epsilon=0.5)  # less than one round of this run costs
        overrides = [*topo.federation_overrides(), *TINY, "num_rounds=1", "privacy.epsilon=8"]

        attack = run_privfed(
            tmp_path / "attack",
            *overrides,
            timeout=420,
            extra_env={"PYTHONPATH": str(evil)},  # the server's own, patched privfed
        )
        assert attack.returncode == 0, attack.stdout[-4000:] + topo.log("superlink")[-3000:]
        row = json.loads((tmp_path / "attack" / "run" / "metrics.jsonl").read_text())
        assert row["clients_trained"] == 0 and row["clients_failed"] == 2, row
        for i in (0, 1):
            log = topo.log(f"node-{i}")
            assert "refused the server's app" in log and "not approved on this device" in log
            assert not list((tmp_path / f"device-{i}").glob("releases/**/*.pt"))
            assert Ledger(tmp_path / f"device-{i}" / "device-ledger.sqlite").rows() == []

        honest = run_privfed(tmp_path / "honest", *overrides, timeout=420)
        assert honest.returncode == 0, honest.stdout[-4000:]
        row = json.loads((tmp_path / "honest" / "run" / "metrics.jsonl").read_text())
        assert row["clients_trained"] == 1 and row["clients_device_refused"] == 1, row
        assert "running approved app " + app_bundle.installed_digest() in topo.log("node-0")
        assert len(Ledger(tmp_path / "device-0" / "device-ledger.sqlite").events("client-0")) == 1
        assert Ledger(tmp_path / "device-1" / "device-ledger.sqlite").rows() == []
    finally:
        topo.close()
