"""Every strategy at equal privacy: the privacy-utility benchmark (issue 4).

    python bench/strategies.py                       # run the sweep, then write the report
    python bench/strategies.py --report-only DIR     # rebuild the report from a finished sweep
    python bench/strategies.py --seeds 0 1 2 --rounds 10 --max-examples 0   # the full setting

It runs two Hydra multiruns through the real CLI (``privfed -m``): every strategy at
``privacy.epsilon`` in {1, 3, 8} (delta 1e-5) and every strategy with ``privacy=none``, on BBC News
with a Dirichlet(alpha = 0.5) partition over 10 clients, for several seeds. Then it writes, next
to the sweeps:

* ``results.md``: accuracy mean +- std over seeds, epsilon spent (max over clients), bytes up
  per client per round, and the ratio of that to ``lora``'s (all measured from the serialized
  Flower messages), one row per (strategy, epsilon);
* ``results.csv``: every run;
* ``privacy_utility.png``: accuracy against epsilon, one line per strategy (non-private runs at
  the right edge).

Defaults are sized for a 2-core machine (5 rounds on 1200 examples); the README records the
setting next to the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
# Every registered strategy (privfed/conf/strategy/*.yaml), the baseline first.
STRATEGIES = ["lora", *sorted(p.stem for p in (REPO / "privfed/conf/strategy").glob("*.yaml"))]
STRATEGIES = list(dict.fromkeys(STRATEGIES))


def sweep(out: Path, args: argparse.Namespace, private: bool) -> Path:
    sweep_dir = out / ("sweep_dp" if private else "sweep_none")
    overrides = [
        f"strategy={','.join(args.strategies)}",
        f"seed={','.join(str(s) for s in args.seeds)}",
        f"num_rounds={args.rounds}",
        "data.partitioner.name=dirichlet",
        f"data.partitioner.alpha={args.alpha}",
        f"federation.num_clients={args.clients}",
        "telemetry.progress=false",
        *([f"data.max_examples={args.max_examples}"] if args.max_examples else []),
        *(
            ["privacy=dp_sgd", f"privacy.epsilon={','.join(str(e) for e in args.epsilons)}"]
            if private
            else ["privacy=none"]
        ),
        *args.override,
    ]
    cmd = [sys.executable, "-m", "privfed.cli", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    print("$ privfed -m " + " ".join(overrides), file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return sweep_dir


def collect(dirs: list[Path]) -> list[dict]:
    runs = []
    for sweep_dir in dirs:
        for run in sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").exists()):
            summary = json.loads((run / "summary.json").read_text())
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
            clients = [r["clients_trained"] + r["clients_sat_out"] for r in rows]
            up = sum(r["bytes_up"] for r in rows) / max(1, sum(clients))
            runs.append(
                {
                    "strategy": summary["strategy"],
                    "epsilon_target": summary["epsilon_target"],
                    "seed": cfg["seed"],
                    "accuracy": summary["final_accuracy"],
                    "best_accuracy": summary["best_accuracy"],
                    "epsilon_spent": summary["epsilon_spent"],
                    "noise_multiplier": summary["noise_multiplier"],
                    "bytes_up_per_client_round": up,
                    "wall_time_s": summary["wall_time_s"],
                    "run_dir": str(run),
                }
            )
    return runs


def report(runs: list[dict], out: Path) -> str:
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    groups: dict[tuple[str, float | None], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["strategy"], r["epsilon_target"])].append(r)
    lora_up = np.mean([r["bytes_up_per_client_round"] for r in runs if r["strategy"] == "lora"])
    order = {s: i for i, s in enumerate(STRATEGIES)}
    keys = sorted(groups, key=lambda k: (order.get(k[0], 99), k[1] is None, k[1] or 0))
    lines = [
        "| strategy | epsilon target | accuracy (mean ± std) | epsilon spent "
        "| bytes up / client / round | vs lora | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        g = groups[key]
        acc = np.array([r["accuracy"] for r in g])
        up = float(np.mean([r["bytes_up_per_client_round"] for r in g]))
        eps = max(r["epsilon_spent"] for r in g)
        lines.append(
            f"| {key[0]} | {key[1] if key[1] is not None else 'non-private'} "
            f"| {acc.mean():.3f} ± {acc.std(ddof=1) if len(acc) > 1 else 0.0:.3f} "
            f"| {eps:.2f} | {up:,.0f} | {up / lora_up:.3f} | {len(g)} |"
        )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    plot(groups, out / "privacy_utility.png")
    return table


def plot(groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    strategies = sorted({k[0] for k in groups}, key=lambda s: STRATEGIES.index(s))
    private_eps = sorted({k[1] for k in groups if k[1] is not None})
    x_none = (max(private_eps) * 1.6) if private_eps else 1.0
    for i, s in enumerate(strategies):
        xs, means, stds = [], [], []
        for eps in [*private_eps, None]:
            g = groups.get((s, eps))
            if not g:
                continue
            acc = np.array([r["accuracy"] for r in g])
            xs.append(eps if eps is not None else x_none)
            means.append(acc.mean())
            stds.append(acc.std(ddof=1) if len(acc) > 1 else 0.0)
        offset = 1 + 0.015 * (i - len(strategies) / 2)  # keep error bars apart
        ax.errorbar(np.array(xs) * offset, means, yerr=stds, marker="o", capsize=3, label=s)
    ax.set_xscale("log")
    ticks = [*private_eps, x_none]
    ax.set_xticks(ticks, [f"{e:g}" for e in private_eps] + ["none"])
    ax.minorticks_off()
    ax.set_xlabel("epsilon per client (delta = 1e-5); none = non-private")
    ax.set_ylabel("test accuracy (final round)")
    ax.set_title("privacy-utility: BBC News, Dirichlet(0.5), 10 clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "multirun" / "bench_strategies")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--max-examples", type=int, default=1200, help="0: the whole dataset")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides")
    parser.add_argument("--skip-non-private", action="store_true")
    parser.add_argument("--skip-private", action="store_true")
    parser.add_argument(
        "--report-only",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="rebuild the report from finished sweeps (the first DIR gets the report)",
    )
    args = parser.parse_args()

    if args.report_only:
        out = args.report_only[0]
        dirs = [
            d for o in args.report_only for d in (o / "sweep_dp", o / "sweep_none") if d.exists()
        ]
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        dirs = [] if args.skip_private else [sweep(out, args, private=True)]
        if not args.skip_non_private:
            dirs.append(sweep(out, args, private=False))
    runs = collect(dirs)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    print(report(runs, out))
    print(f"\nwrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'privacy_utility.png'}")


if __name__ == "__main__":
    main()
