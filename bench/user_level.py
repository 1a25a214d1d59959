"""The user-level study (issue 17): accuracy against epsilon for cross-device federations,
user-level DP (DP-FedAvg: a whole device protected) next to record-level DP-SGD (one record of a
device protected) at the same epsilon.

    python bench/user_level.py             # every cell not done yet, then the report
    python bench/user_level.py --plan      # done / left / ETA, runs nothing
    python bench/user_level.py --report    # the report from the results file alone

The setting: the default model (MiniLM + LoRA) and the whole BBC News dataset, IID over
N in {100, 1000} devices, N/10 of them per round (q = 0.1), plain LoRA; at epsilon in {1, 3, 8}
(delta 1e-5):

* ``record``: ``privacy=dp_sgd privacy.epsilon=eps``, DP-SGD on every device, accounted per
  device over the rounds it takes part in (one record of a device is protected);
* ``user``: ``privacy=user privacy.user.epsilon=eps``, DP-FedAvg with server-side clipping
  (C = ``privacy.user.clip_norm``) and Gaussian noise on the sum, accounted for the population
  over all rounds at the sampling rate q (a whole device is protected; central DP: not against
  the server);

and non-private, seeds 0 and 1. Each run is the real CLI in a subprocess, resumable as
bench/strategies.py is: one line per finished run in ``bench/results/user_level.jsonl`` (kept in
git), keyed by the sha256 of the composed config. The report goes next to it:
``user_level.md`` (accuracy with 95% intervals, epsilon spent, sigma, the L2 norm of the noise
on the mean update against the clip norm, wall time) and ``user_level.png`` (accuracy against
epsilon, a line per unit and N).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from strategies import append, composed, eta, key_of, load, run_cli  # noqa: E402
from study_stats import t_interval  # noqa: E402

RESULTS = REPO / "bench" / "results" / "user_level.jsonl"
RUNS = REPO / "multirun" / "user_level"
POPULATIONS = [100, 1000]
SAMPLING = 0.1  # clients_per_round = q N
UNITS = ["record", "user"]
EPSILONS: list[float | None] = [1.0, 3.0, 8.0, None]  # None: non-private (one arm, unit-free)
SEEDS = [0, 1]
ROUNDS = 20
DEFAULT_RUN_S = 300.0  # the ETA before any run has been timed


@dataclass(frozen=True)
class Cell:
    population: int
    unit: str  # "record", "user" or "none" (non-private)
    epsilon: float | None
    seed: int

    def overrides(self, rounds: int) -> list[str]:
        if self.unit == "record":
            privacy = ["privacy=dp_sgd", f"privacy.epsilon={self.epsilon:g}"]
        elif self.unit == "user":
            privacy = ["privacy=user", f"privacy.user.epsilon={self.epsilon:g}"]
        else:
            privacy = ["privacy=none"]
        return [
            "strategy=lora",
            *privacy,
            f"federation.num_clients={self.population}",
            f"federation.clients_per_round={round(SAMPLING * self.population)}",
            "data.partitioner.name=iid",
            f"num_rounds={rounds}",
            "telemetry.progress=false",
            f"seed={self.seed}",
        ]

    @property
    def label(self) -> str:
        eps = "none" if self.epsilon is None else f"{self.epsilon:g}"
        return f"N={self.population} {self.unit} eps={eps} seed={self.seed}"


def cells(args: argparse.Namespace) -> list[Cell]:
    out = []
    for seed in args.seeds:
        for population in args.populations:
            for eps in args.epsilons:
                units = ["none"] if eps is None else args.units
                out.extend(Cell(population, unit, eps, seed) for unit in units)
    return out


def sit(args: argparse.Namespace) -> None:
    done = load(args.results)
    todo_cells = cells(args)
    keys = {c: key_of(composed(c.overrides(args.rounds))) for c in todo_cells}
    todo = [c for c in todo_cells if keys[c] not in done]
    timed = [r["wall_s"] for r in done.values()]
    per_run = float(np.mean(timed)) if timed else DEFAULT_RUN_S
    print(
        f"{args.results}: {len(todo_cells) - len(todo)} of {len(todo_cells)} runs done, "
        f"{len(todo)} left, ETA {eta(len(todo) * per_run)}",
        flush=True,
    )
    if args.plan:
        for cell in todo:
            print(f"  to run: {cell.label}")
        return
    for i, cell in enumerate(todo):
        per_run = float(np.mean(timed)) if timed else DEFAULT_RUN_S
        print(
            f"[{len(todo_cells) - len(todo) + i + 1}/{len(todo_cells)}] {cell.label} "
            f"({len(todo) - i} left, ETA {eta((len(todo) - i) * per_run)})",
            flush=True,
        )
        row = run_cli(cell.overrides(args.rounds), keys[cell], args.runs_dir)
        if row is None:
            continue
        row.update(population=cell.population, unit=cell.unit, epsilon=cell.epsilon, seed=cell.seed)
        append(args.results, row)
        timed.append(row["wall_s"])
        spent = row.get("epsilon_user", row["epsilon_spent"])
        print(
            f"  accuracy {row['accuracy']:.3f}, epsilon {spent:.3f}, {row['wall_s']:.0f} s",
            flush=True,
        )


def report(results: Path) -> str:
    rows = [r for r in load(results).values() if "unit" in r]
    if not rows:
        raise SystemExit(f"{results}: no runs yet (run: python bench/user_level.py)")
    by_cell: dict[tuple[int, str, float | None], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_cell[(r["population"], r["unit"], r["epsilon"])][r["seed"]] = r
    order = {"record": 0, "user": 1, "none": 2}
    # numbers one device uploads (float32; the record-level and non-private rows report bytes,
    # a user-level run withholds them): d in the noise's L2 norm below
    uploaded = {
        r["population"]: r["bytes_up_per_client_round"] / 4
        for r in rows
        if r.get("bytes_up_per_client_round")
    }
    lines = [
        "| devices N (per round) | ε | unit | accuracy (95% CI) | ε spent | σ "
        "| noise on the mean update, L2 ÷ C | s / round | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(by_cell, key=lambda k: (k[0], k[2] is None, k[2] or 0, order[k[1]])):
        population, unit, eps = key
        runs = list(by_cell[key].values())
        acc = t_interval([r["accuracy"] for r in runs])
        one = runs[0]
        noise = "—"
        if unit == "user":
            spent = max(r["epsilon_user"] for r in runs)
            sigma = one["user_noise_multiplier"]
            d = uploaded.get(population)
            # the server divides the noised sum by the expected count q N (user_level.py)
            if d:
                noise = f"{sigma * d**0.5 / (SAMPLING * population):.2f} (σ√d / qN, d ≈ {d:,.0f})"
            sigma_text = f"{sigma:.3f}"
        elif unit == "record":
            spent = max(r.get("epsilon_pld", r["epsilon_spent"]) for r in runs)
            sigma_text = f"{one['noise_multiplier']:.3f}"
            noise = "on each device (DP-SGD)"
        else:
            spent, sigma_text = None, "—"
        lines.append(
            f"| {population} ({round(SAMPLING * population)}) "
            f"| {'none' if eps is None else f'{eps:g}'} | {unit} | {acc.text()} "
            f"| {'—' if spent is None else f'{spent:.3f}'} | {sigma_text} | {noise} "
            f"| {np.mean([r['wall_s_per_round'] for r in runs]):.1f} | {acc.n} |"
        )
    text = "\n".join(["### User-level and record-level DP at the same ε", *lines])
    (results.parent / "user_level.md").write_text(text + "\n")
    plot(by_cell, results.parent / "user_level.png")
    return text


def plot(by_cell: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    private = sorted({k[2] for k in by_cell if k[2] is not None})
    x_none = max(private) * 1.8 if private else 1.0
    colours = {100: "tab:blue", 1000: "tab:red"}
    for population in sorted({k[0] for k in by_cell}):
        for unit, style in (("record", "--"), ("user", "-")):
            xs, ys, halves = [], [], []
            for eps in private:
                runs = by_cell.get((population, unit, eps))
                if not runs:
                    continue
                ci = t_interval([r["accuracy"] for r in runs.values()])
                xs.append(eps)
                ys.append(ci.mean)
                halves.append(0.0 if ci.n < 2 else ci.half_width)
            if xs:
                ax.errorbar(
                    xs,
                    ys,
                    yerr=halves,
                    fmt="o" + style,
                    capsize=3,
                    color=colours.get(population),
                    label=f"N = {population}, {unit}-level",
                )
        none = by_cell.get((population, "none", None))
        if none:
            acc = np.mean([r["accuracy"] for r in none.values()])
            ax.plot(
                [x_none],
                [acc],
                marker="*",
                markersize=12,
                color=colours.get(population),
                linestyle="none",
                label=f"N = {population}, non-private",
            )
    ax.set_xscale("log")
    ticks = [*private, x_none]
    ax.set_xticks(ticks, [f"{e:g}" for e in private] + ["none"])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"User-level vs record-level DP, MiniLM + LoRA, q = {SAMPLING:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", action="store_true", help="say what is left; run nothing")
    parser.add_argument("--report", action="store_true", help="only the report")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--runs-dir", type=Path, default=RUNS)
    parser.add_argument("--populations", type=int, nargs="+", default=POPULATIONS)
    parser.add_argument("--units", nargs="+", default=UNITS, choices=UNITS)
    parser.add_argument(
        "--epsilons",
        type=lambda s: None if s == "none" else float(s),
        nargs="+",
        default=EPSILONS,
        help="numbers, or none for the non-private arm",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    if not args.report:
        sit(args)
        if args.plan:
            return
    print(report(args.results))


if __name__ == "__main__":
    main()
