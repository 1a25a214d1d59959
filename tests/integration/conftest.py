from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def privfed_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PRIVFED_CACHE"] = str(tmp_path / "cache")
    # Ray workers import test-only strategies (fault injectors) from tests/.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_privfed(
    tmp_path: Path,
    *overrides: str,
    timeout: float = 300,
    multirun: bool = False,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the real CLI (Hydra -> validation -> Flower simulation on Ray) in a subprocess; its
    whole process group is killed if it overruns. Outputs: tmp_path/run, or tmp_path/sweep/N."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out_dir = (
        ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        if multirun
        else [f"hydra.run.dir={tmp_path / 'run'}"]
    )
    cmd = [sys.executable, "-m", "privfed.cli", *out_dir, *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**privfed_env(tmp_path), **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the process and everything it started (Ray's raylet, workers, GCS)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    time.sleep(1.0)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def tiny_overrides():
    return [
        "model=tiny_bert",
        "data.max_examples=300",
        "federation.num_clients=3",
        "telemetry.plot=true",
        "federation.ray_num_cpus=2",
    ]
