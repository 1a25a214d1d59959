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
        self.started_at = time.time()  # wall clock: calls line up across processes

    def write(self, server_round: int) -> None:
        if self.path is None or self.clock is None:
            return
        row = {
            "round": server_round,
            "call_s": time.perf_counter() - self.started,
            "compute_s": self.clock.seconds,
            "started_at": self.started_at,
            "ended_at": time.time(),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_profiles(folder: Path) -> list[dict]:
    """Every call recorded under ``folder`` (all processes), each with its process's ``pid``."""
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        rows += [{**json.loads(line), "pid": int(path.stem)} for line in lines if line]
    return rows


def gaps_and_margin(calls: list[dict], wall_s: float) -> tuple[float, float]:
    """Where a round's time outside its client calls went, from the calls' wall-clock bounds:
    the seconds each process spent between its calls while the round's calls ran (Ray's actor
    calls, Flower's message handling, waiting for work), summed over the processes; and the
    round's wall outside the span of its calls (the server configuring the round, reading the
    last replies and aggregating)."""
    start = min(c["started_at"] for c in calls)
    end = max(c["ended_at"] for c in calls)
    by_process: dict[int, list[dict]] = {}
    for c in calls:
        by_process.setdefault(c["pid"], []).append(c)
    gaps = 0.0
    for own in by_process.values():
        busy = sum(c["ended_at"] - c["started_at"] for c in own)
        gaps += (end - start) - busy
    return gaps, max(0.0, wall_s - (end - start))
