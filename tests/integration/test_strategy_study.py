"""The strategy study for real (bench/strategies.py through the CLI, tiny model): a sitting
records each finished run once, with the figures the report needs, and a rerun skips it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_sitting_records_its_run_once_and_a_rerun_skips_it(tmp_path):
    results = tmp_path / "results.jsonl"
    cmd = [
        sys.executable, "bench/strategies.py", "--results", str(results),
        "--runs-dir", str(tmp_path / "runs"),
        "--arms", "lora", "--epsilons", "8", "--seeds", "0",
        "--override", "model=tiny_bert", "data.max_examples=300", "federation.num_clients=3",
        "num_rounds=1", "federation.ray_num_cpus=2",
    ]  # fmt: skip
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert "0 of 1 runs done, 1 left" in first.stdout
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert (row["arm"], row["epsilon"], row["seed"], row["rounds"]) == ("lora", 8.0, 0, 1)
    assert 0 < row["epsilon_pld"] <= row["epsilon_rdp"] and row["epsilon_pld"] <= 8.0 + 1e-9
    assert row["bytes_up_per_client_round"] > 0 and row["noise_multiplier"] > 0
    sections = {
        part.split("\n", 1)[0]: part
        for part in (tmp_path / "study.md").read_text().split("### ")[1:]
    }
    for title in (
        "Accuracy",
        "Accuracy per megabyte uploaded per client",
        "Convergence: accuracy by round (mean over seeds)",
    ):
        assert sections[title].count("| 8 | lora |") == 1, title

    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "1 of 1 runs done, 0 left" in second.stdout
    assert len(results.read_text().splitlines()) == 1
