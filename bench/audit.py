"""The one-run privacy audit of every strategy: empirical lower bound next to the theory.

    python bench/audit.py                                   # tiny model, minutes on 2 cores
    python bench/audit.py --epsilons 1 8 --canaries 1000 \\
        --overrides model=minilm_lora data.max_examples=1000 num_rounds=4

Runs ``privfed audit.enabled=true`` once per (strategy, epsilon), plus deliberately broken runs
of lora per epsilon (``--broken``: noise off, clipping off, noise a server can regenerate from
the config; the accountant charges the intact mechanism) to show the audit's power in the same
setting. Both auditors' bounds are shown: ``released`` (the DP-SGD releases at the canaries'
coordinates) and ``white-box`` (the same minus the noise the config determines). Prints one
Markdown table and writes a CSV to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from privfed.strategies.registry import STRATEGIES  # noqa: E402  (every registered strategy)

TINY = [
    "model=tiny_bert",
    "data.max_examples=300",
    "federation.num_clients=3",
    "federation.ray_num_cpus=2",
    "num_rounds=2",
]


def audit_run(strategy: str, epsilon: float, args, broken: str = "none") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "privfed.cli",
            f"hydra.run.dir={run}",
            *args.overrides,
            f"strategy={strategy}",
            f"privacy.epsilon={epsilon}",
            "audit.enabled=true",
            f"audit.canaries={args.canaries}",
            f"audit.break_mechanism={broken}",
            "telemetry.progress=false",
            "telemetry.plot=false",
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=3600)
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"{strategy} at eps={epsilon} failed:\n{proc.stdout[-3000:]}")
        record = json.loads((run / "audit.json").read_text())
    auditors = record["audit"]["auditors"]
    return {
        "strategy": strategy + ("" if broken == "none" else f" (broken: {broken})"),
        "epsilon_target": epsilon,
        "epsilon_theory": round(record["epsilon_theory"], 3),
        "released": round(auditors["released"]["epsilon_lower"], 3),
        "released_right": f"{auditors['released']['correct']}/{auditors['released']['guesses']}",
        "white_box": round(auditors["white_box"]["epsilon_lower"], 3),
        "white_box_right": (
            f"{auditors['white_box']['correct']}/{auditors['white_box']['guesses']}"
        ),
        "verdict": "pass" if record["audit_passed"] else "FAIL (caught)",
        "wall_s": round(time.perf_counter() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 8.0])
    parser.add_argument("--canaries", type=int, default=300)
    parser.add_argument("--overrides", nargs="*", default=TINY)
    parser.add_argument(
        "--broken",
        nargs="*",
        default=["no_noise", "known_noise"],
        choices=["no_noise", "no_clipping", "known_noise"],
        help="deliberately broken lora runs per epsilon (none: --broken with no value)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "audit")
    args = parser.parse_args()
    rows = []
    print(
        "| strategy | ε target | ε theory | ε lower, released (right/guesses) "
        "| ε lower, white-box (right/guesses) | verdict |\n|---|---|---|---|---|---|",
        flush=True,
    )
    for eps in args.epsilons:
        jobs = [(s, "none") for s in args.strategies] + [("lora", b) for b in args.broken]
        for strategy, broken in jobs:
            row = audit_run(strategy, eps, args, broken)
            rows.append(row)
            print(
                f"| {row['strategy']} | {eps:g} | {row['epsilon_theory']} | "
                f"{row['released']} ({row['released_right']}) | "
                f"{row['white_box']} ({row['white_box_right']}) | {row['verdict']} |",
                flush=True,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "audit.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
