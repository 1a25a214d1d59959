"""Device-local timing of client calls, for benchmarks (``bench/simulation.py --scale``).

Under DP a client's timing must not reach the server (it depends on its Poisson batches), so
this never enters a reply: with ``PRIVFED_CLIENT_PROFILE`` set to a folder, each client process
appends one JSON line per call to ``<folder>/<pid>.jsonl`` on its own machine: the round, the
whole call's seconds and the seconds in forward and backward passes. Unset (the default), no
clock runs and nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

PROFILE_ENV = "PRIVFED_CLIENT_PROFILE"


class ComputeClock:
    """Seconds spent in forward and backward passes (what a benchmark calls a client's compute,
    apart from the fixed cost of a call). Synchronises CUDA around each pass, so it is only
    passed in when someone measures."""

    def __init__(self, device: str = "cpu") -> None:
        self.seconds = 0.0
        self._cuda = device.startswith("cuda")
        self._started = 0.0

    def __enter__(self) -> ComputeClock:
        if self._cuda:
            torch.cuda.synchronize()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._started


class NoClock:
    """No clock (nobody measures)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class CallProfile:
    def __init__(self, device: str) -> None:
        folder = os.environ.get(PROFILE_ENV)
        self.path = Path(folder) / f"{os.getpid()}.jsonl" if folder else None
        self.clock = ComputeClock(device) if self.path is not None else None
        self.started = time.perf_counter()

    def write(self, server_round: int) -> None:
        if self.path is None or self.clock is None:
            return
        row = {
            "round": server_round,
            "call_s": time.perf_counter() - self.started,
            "compute_s": self.clock.seconds,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_profiles(folder: Path) -> list[dict]:
    """Every call recorded under ``folder`` (all processes)."""
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return rows
