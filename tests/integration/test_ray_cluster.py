"""A federation on a Ray cluster that it did not start (``federation.ray_address``): a head and
a second worker node on this machine (two raylets, loopback only), one CPU each, and clients
that need one CPU each, so the actor pool spans both nodes; Ray's own actor table says where
the ClientApp actors ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Ray rewrites a 127.0.0.1 address to this machine's outward IP before it connects (where a
# loopback-only cluster does not listen), unless it is told that this is no cluster host; that
# is what this variable does for the drivers below. A real cluster's address needs nothing.
LOOPBACK_DRIVER = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

WHERE_CLIENTS_RAN = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], include_dashboard=False, logging_level="ERROR")
actors = [a for a in state.actors().values() if "ClientAppActor" in a["ActorClassName"]]
print(json.dumps({"ran_on": sorted({a["Address"]["NodeID"] for a in actors}),
                  "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}))
"""


def test_a_federation_runs_on_both_nodes_of_an_existing_ray_cluster(tmp_path, tiny_overrides):
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    loopback = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
    try:
        cluster.add_node(**loopback)
        cluster.wait_for_nodes(timeout=60)
        overrides = [o for o in tiny_overrides if not o.startswith("federation.ray_num_cpus")]
        run_dir = tmp_path / "run"
        cmd = [
            sys.executable, "-m", "privfed.cli", *overrides, "num_rounds=1",
            "federation.num_clients=4", f"federation.ray_address={cluster.address}",
            f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, cwd=REPO, env=LOOPBACK_DRIVER, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert f"attaching to the Ray cluster at {cluster.address}" in proc.stdout + proc.stderr
        summary = json.loads((run_dir / "summary.json").read_text())
        (row,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert summary["rounds_completed"] == 1 and row["clients_trained"] == 4

        where = subprocess.run(
            [sys.executable, "-c", WHERE_CLIENTS_RAN, cluster.address],
            env=LOOPBACK_DRIVER, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert where.returncode == 0, where.stderr[-2000:]
        placement = json.loads(where.stdout.strip().splitlines()[-1])
        assert placement["ran_on"] == placement["nodes"] and len(placement["nodes"]) == 2
    finally:
        cluster.shutdown()


def test_an_attached_run_takes_no_cpu_count_of_its_own(tmp_path):
    cmd = [
        sys.executable, "-m", "privfed.cli", "federation.ray_address=127.0.0.1:6379",
        "federation.ray_num_cpus=2", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ray_address: a Ray cluster brings its own CPUs" in proc.stdout + proc.stderr
