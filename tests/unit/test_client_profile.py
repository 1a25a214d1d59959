"""telemetry/client_profile.py: the benchmark's device-local timing of client calls."""

from __future__ import annotations

import os

import pytest

from privfed.telemetry.client_profile import (
    PROFILE_ENV,
    CallProfile,
    gaps_and_margin,
    read_profiles,
)


def test_a_profiled_call_is_one_line_with_its_process_and_wall_clock_bounds(tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path))
    profile = CallProfile("cpu")
    assert profile.clock is not None
    with profile.clock:
        sum(range(10_000))
    profile.write(server_round=3)
    (row,) = read_profiles(tmp_path)
    assert row["round"] == 3 and row["pid"] == os.getpid()
    assert 0 < row["compute_s"] <= row["call_s"]
    assert row["started_at"] <= row["ended_at"]
    assert row["ended_at"] - row["started_at"] == pytest.approx(row["call_s"], abs=0.05)


def test_without_the_variable_nothing_is_timed_or_written(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    profile = CallProfile("cpu")
    profile.write(server_round=1)
    assert profile.clock is None and list(tmp_path.iterdir()) == []


def test_a_rounds_time_outside_its_calls_is_split_into_gaps_and_the_servers_margin():
    """Fake calls (named as such) of two processes over a round of 10 s wall: their calls span
    1..8 s; process 1 is busy 1-3 and 4-8 (1 s between), process 2 busy 2-5 (1 s before, 3 s
    after): 5 s of gaps, and 10 - 7 = 3 s of the round outside the calls."""
    fake_calls = [
        {"pid": 1, "started_at": 1.0, "ended_at": 3.0},
        {"pid": 1, "started_at": 4.0, "ended_at": 8.0},
        {"pid": 2, "started_at": 2.0, "ended_at": 5.0},
    ]
    gaps, margin = gaps_and_margin(fake_calls, wall_s=10.0)
    assert gaps == pytest.approx(5.0)
    assert margin == pytest.approx(3.0)
