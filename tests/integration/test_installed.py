"""privfed installed the way a user installs a wheel (`pip install .`, not editable) and run from
another directory: its Hydra config ships as package data, so it finds it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, privfed_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_non_editable_install_runs_from_any_directory(tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # --no-deps: the dependencies are the ones this environment already has.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    assert (target / "privfed" / "conf" / "config.yaml").exists()
    env = privfed_env(tmp_path)
    env["PYTHONPATH"] = str(target)  # the installed copy, not the checkout
    run = elsewhere / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "privfed.cli",
            f"hydra.run.dir={run}",
            "model=tiny_bert",
            "data.max_examples=120",
            "federation.num_clients=2",
            "federation.ray_num_cpus=2",
            "num_rounds=1",
            "telemetry.plot=false",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"privfed: run directory: {run}" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    imported = subprocess.run(
        [sys.executable, "-c", "import privfed; print(privfed.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert imported.startswith(str(target))  # not the checkout
