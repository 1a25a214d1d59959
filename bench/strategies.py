"""The strategy study (issue 16): privacy, utility and communication of every strategy.

    python bench/strategies.py --tune       # 1. learning rates: 3 per strategy at eps 8, seed 0
    python bench/strategies.py              # 2. the study: every cell not done yet, then the report
    python bench/strategies.py --plan       # what is done, what is left, and an ETA; runs nothing
    python bench/strategies.py --report     # the report from the results file alone

The setting: the default model and data (MiniLM + LoRA, BBC News, the whole dataset), a
Dirichlet(0.5) partition over 10 clients, 10 rounds; every strategy (RQM in ``mode=compress`` at
16 and 4 levels, Fed-SB with its default init) at epsilon in {1, 3, 8} (delta 1e-5) and
non-private, seeds 0, 1, 2. Each run is the real CLI (``python -m privfed.cli``) in a subprocess.

**Resumable.** Every finished run is one line of the results file (JSON lines,
``bench/results/study.jsonl``, small and kept in git: the data behind README's tables), keyed by the
sha256 of its full composed config (what it computes, not where it runs: the cache directory,
telemetry, Ray resources and the device are left out of the key). A rerun skips every key that
is there, so the study can be finished over several sittings (about 5 hours on 2 cores) or on a
GPU machine (``--override model.device=cuda federation.client_resources.num_gpus=0.25``), and the
results merge. A line is appended only when its run has finished; a killed sitting loses at most
the run in progress. A progress line before each run says done, left and the ETA.

**Tuning.** ``--tune`` runs every strategy at epsilon 8, seed 0, with the learning rate at
0.5x, 1x and 2x its default (``privacy.suggested_learning_rate``); while a strategy's best final
accuracy is at the edge of what it has tried, the grid goes one more factor of 2 past that edge
(at most to 1/8x and 8x). The study then uses each strategy's best factor: the same rule for every
strategy, plain LoRA included. Until a strategy's tuning is complete, the study uses its default.

**Stale results.** A line counts only while the current code would run exactly it: its cell's
overrides and composed config give the same key today. A changed default (a strategy's rank,
the setting) makes the old lines stale: they stay in the file, and ``--plan`` counts them, but
no table, tuning choice or skip uses them.

**Report** (written next to the results file): ``study.md`` (the tables: accuracy with 95%
intervals, the paired difference to ``lora`` at the same epsilon and whether it is real; the
same for accuracy per uploaded megabyte; epsilon spent by PLD and by RDP; sigma; wall time per
round; bytes up and down per client per round; aggregation error; each seed's accuracy; whether
training has levelled off by the last round), ``study.csv`` (every run) and four plots:
``accuracy_vs_epsilon.png``, ``frontier.png`` (accuracy against megabytes uploaded per client),
``rounds_eps1.png`` (accuracy per round at epsilon 1) and ``rounds.png`` (per round at every
epsilon, side by side).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from study_stats import (  # noqa: E402
    Interval,
    paired_difference,
    sign_test,
    sign_verdict,
    t_interval,
    verdict,
)

from privfed.strategies.registry import STRATEGIES  # noqa: E402

CONF = REPO / "privfed" / "conf"
RESULTS = REPO / "bench" / "results" / "study.jsonl"  # small, kept in git: the study's data
RUNS = REPO / "multirun" / "study"  # each run's directory (outputs, not kept)

# A strategy whose study arms are its variants rather than its defaults (RQM compresses here).
VARIANTS: dict[str, dict[str, list[str]]] = {
    "rqm": {
        "rqm16": ["strategy=rqm", "strategy.mode=compress", "strategy.levels=16"],
        "rqm4": ["strategy=rqm", "strategy.mode=compress", "strategy.levels=4"],
    },
}
BASELINE = "lora"
# Every registered strategy is an arm (or its variants are), the baseline first.
ARMS: dict[str, list[str]] = {
    arm: overrides
    for name in sorted(STRATEGIES, key=lambda n: n != BASELINE)
    for arm, overrides in VARIANTS.get(name, {name: [f"strategy={name}"]}).items()
}
EPSILONS: list[float | None] = [1.0, 3.0, 8.0, None]  # None: non-private
SEEDS = [0, 1, 2]
SETTING = [
    "num_rounds=10",
    "federation.num_clients=10",
    "data.partitioner.name=dirichlet",
    "data.partitioner.alpha=0.5",
    "telemetry.progress=false",
]
LR_GRID = [0.5, 1.0, 2.0]  # every strategy's first learning-rate factors
LR_BOUNDS = (0.125, 8.0)  # the grid grows by 2x past a winning edge, at most to these
TUNE_EPSILON, TUNE_SEED = 8.0, 0
# Where a run happens, not what it computes: left out of a run's key.
NOT_IN_KEY = [
    ("telemetry",),
    ("resume",),
    ("data", "cache_dir"),
    ("federation", "client_resources"),
    ("federation", "ray_num_cpus"),
    ("federation", "round_timeout_s"),
    # a worker's model built once or per call: the same releases (tests/unit/test_worker_model.py)
    ("federation", "reuse_client_model"),
    # clients bundled into one actor call or not: the same releases, the same run to the last
    # bit (tests/integration/test_simulation.py)
    ("federation", "messages_per_call"),
    # when a bundle's writes reach the disk (once per call or each), not what they hold
    ("federation", "flush_per_call"),
    ("model", "device"),
]
# How a client reaches its accountant, not what it charges: recorded runs without DP-SGD had
# only these of privacy.accountant (privacy/none.yaml now takes dp_sgd.yaml's whole block).
ACCOUNTANT_IN_KEY_WITHOUT_DP = ("method", "backend", "url")
# Config keys added after results were recorded, at the value that computes what those runs did:
# left out of a run's key, so that the recorded runs still count.
NEUTRAL: dict[tuple[str, ...], Any] = {
    ("model", "pooling"): "cls",
    ("privacy", "user", "aggregation"): "central",
}
DEFAULT_RUN_S = 225.0  # the ETA before any run has been timed: the default run here (3m45s)


@dataclass(frozen=True)
class Cell:
    """One run to make: a strategy (arm) at one epsilon and seed, with a learning-rate factor."""

    arm: str
    epsilon: float | None
    seed: int
    lr_factor: float
    phase: str  # "tune" or "study"

    def overrides(self, setting: list[str], default_lr: float) -> list[str]:
        privacy = (
            ["privacy=none"]
            if self.epsilon is None
            else ["privacy=dp_sgd", f"privacy.epsilon={self.epsilon:g}"]
        )
        return [
            *ARMS[self.arm],
            *privacy,
            *setting,
            f"seed={self.seed}",
            f"train.learning_rate={default_lr * self.lr_factor:.6g}",
        ]


def composed(overrides: list[str]) -> dict[str, Any]:
    """The full config the CLI would compose from ``overrides`` (resolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=overrides)
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    return raw


class Plan:
    """Each cell's overrides and key under the current code and setting (composed once)."""

    def __init__(self, setting: list[str]) -> None:
        self.setting = setting
        self._lrs: dict[tuple[str, float | None], float] = {}
        self._keys: dict[tuple[str, ...], str] = {}

    def overrides(self, cell: Cell) -> list[str]:
        if (cell.arm, cell.epsilon) not in self._lrs:
            self._lrs[(cell.arm, cell.epsilon)] = default_lr(cell.arm, cell.epsilon, self.setting)
        return cell.overrides(self.setting, self._lrs[(cell.arm, cell.epsilon)])

    def key(self, cell: Cell) -> str:
        overrides = tuple(self.overrides(cell))
        if overrides not in self._keys:
            self._keys[overrides] = key_of(composed(list(overrides)))
        return self._keys[overrides]

    def current(self, done: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The lines the current code would run exactly (see Stale results above)."""
        return {k: r for k, r in done.items() if r.get("arm") in ARMS and self.key(cell_of(r)) == k}


def cell_of(row: dict[str, Any]) -> Cell:
    return Cell(row["arm"], row["epsilon"], row["seed"], row["lr_factor"], row["phase"])


def key_of(config: dict[str, Any]) -> str:
    """sha256 of what a run computes: its composed config minus where it runs."""
    trimmed = json.loads(json.dumps(config))
    privacy = trimmed.get("privacy", {})
    if privacy.get("unit", "record") == "record":  # the user-level block is unused: as before it
        privacy.pop("unit", None)
        privacy.pop("user", None)
    if not privacy.get("enabled", True) and isinstance(privacy.get("accountant"), dict):
        accountant = privacy["accountant"]
        privacy["accountant"] = {k: accountant[k] for k in ACCOUNTANT_IN_KEY_WITHOUT_DP}
    user = privacy.get("user")
    if isinstance(user, dict) and user.get("aggregation", "central") == "central":
        user.pop("secure", None)  # secure aggregation's settings: unused by a central run
    for path, neutral in NEUTRAL.items():  # keys added later, at the value that computes as before
        node = trimmed
        for part in path[:-1]:
            node = node.get(part, {})
        if node.get(path[-1], neutral) == neutral:
            node.pop(path[-1], None)
    for path in NOT_IN_KEY:
        node = trimmed
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(trimmed, sort_keys=True).encode()).hexdigest()


def default_lr(arm: str, epsilon: float | None, setting: list[str]) -> float:
    cell = Cell(arm, epsilon, 0, 1.0, "study")
    overrides = [o for o in cell.overrides(setting, 1.0) if not o.startswith("train.learning")]
    return float(composed(overrides)["privacy"]["suggested_learning_rate"])


# -- the results file --------------------------------------------------------------------------
def load(path: Path) -> dict[str, dict[str, Any]]:
    """Every finished run by key (a torn last line from a killed sitting is skipped)."""
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["key"]] = row
    return done


def append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# -- one run -----------------------------------------------------------------------------------
def measure(run_dir: Path) -> dict[str, Any]:
    """A finished run's figures, from its summary, metrics lines and ledger."""
    from privfed.privacy.accountant import epsilon
    from privfed.privacy.ledger import Ledger

    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    result = {
        "accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "accuracy_by_round": [r["accuracy"] for r in rows],
        "rounds": len(rows),
        "epsilon_spent": summary["epsilon_spent"],
        "epsilon_spent_by": summary.get("epsilon_spent_by"),
        "noise_multiplier": summary["noise_multiplier"],
        "wall_s_per_round": float(np.mean([r["wall_time_s"] for r in rows])),
        "bytes_up_per_client_round": float(np.mean([r["bytes_up_per_client"] for r in rows])),
        "bytes_down_per_client_round": float(np.mean([r["bytes_down_per_client"] for r in rows])),
        "aggregation_error": _mean_of(rows, "aggregation_error"),
    }
    for name in ("epsilon_user", "epsilon_user_by", "user_noise_multiplier", "user_clip_norm"):
        if summary.get(name) is not None:  # a user-level run (privacy.unit=user)
            result[name] = summary[name]
    ledger_file = run_dir / "ledger.sqlite"
    delta = summary.get("delta")
    if delta and ledger_file.exists():
        ledger = Ledger(ledger_file)
        by_client = [ledger.events(c) for c in ledger.clients()]
        by_client = [events for events in by_client if events]
        for method in ("pld", "rdp"):  # pld: the tighter of both, as the ledger enforces
            result[f"epsilon_{method}"] = max(epsilon(e, delta, method) for e in by_client)
        ledger.close()
    return result


def _mean_of(rows: list[dict[str, Any]], name: str) -> float | None:
    values = [r[name] for r in rows if r.get(name) is not None]
    return float(np.mean(values)) if values else None


def commit() -> str:
    """The checkout's commit (what code a run ran), or "unknown"."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_cli(
    overrides: list[str],
    key: str,
    runs: Path,
    measure_run: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """One run of the real CLI in a subprocess: its figures (``measure_run``, by default
    :func:`measure`) and where and when it ran, or None (with the output's tail printed) if it
    failed."""
    run_dir = runs / key[:16]
    shutil.rmtree(run_dir, ignore_errors=True)  # what a killed sitting left of this run
    cmd = [sys.executable, "-m", "privfed.cli", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        print(f"  FAILED (exit {proc.returncode}), left for the next sitting:\n{tail}", flush=True)
        return None
    return {
        "key": key,
        "overrides": overrides,
        "wall_s": wall,
        "run_dir": str(run_dir),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # wall times are this machine's; a load above its cores says something else ran too
        "load_avg_1m": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "commit": commit(),
        **(measure_run or measure)(run_dir),
    }


def run_cell(cell: Cell, overrides: list[str], key: str, runs: Path) -> dict[str, Any] | None:
    row = run_cli(overrides, key, runs)
    if row is None:
        return None
    return {
        **row,
        "arm": cell.arm,
        "epsilon": cell.epsilon,
        "seed": cell.seed,
        "lr_factor": cell.lr_factor,
        "phase": cell.phase,
    }


# -- what to run -------------------------------------------------------------------------------
def best_factor(tried: dict[float, float]) -> float:
    """The factor with the best final accuracy (a tie goes to the one nearer 1x)."""
    return max(tried, key=lambda f: (tried[f], -abs(np.log2(f))))


def tune_grid(tried: dict[float, float]) -> list[float]:
    """The learning-rate factors one strategy's tuning needs, given ``tried`` (factor ->
    accuracy): the first grid, then one factor of 2 past an edge while the best is there."""
    grid = sorted(set(LR_GRID) | set(tried))
    if any(f not in tried for f in grid):
        return grid
    best = best_factor(tried)
    if best == grid[0] and best / 2 >= LR_BOUNDS[0]:
        return [best / 2, *grid]
    if best == grid[-1] and best * 2 <= LR_BOUNDS[1]:
        return [*grid, best * 2]
    return grid


def _tried(done: dict[str, dict[str, Any]], arm: str) -> dict[float, float]:
    return {
        r["lr_factor"]: r["accuracy"]
        for r in done.values()
        if r["arm"] == arm and r["phase"] == "tune"
    }


def tuned_factors(done: dict[str, dict[str, Any]], arms: list[str]) -> dict[str, float]:
    """Each arm's best learning-rate factor, where its tuning is complete (else 1.0)."""
    factors = {}
    for arm in arms:
        tried = _tried(done, arm)
        complete = bool(tried) and set(tune_grid(tried)) <= set(tried)
        factors[arm] = best_factor(tried) if complete else 1.0
    return factors


def cells(args: argparse.Namespace, done: dict[str, dict[str, Any]]) -> list[Cell]:
    """The cells of this sitting, given what is done: for ``--tune``, each strategy's grid so
    far (it can grow once these have run); else the study with the tuned factors."""
    if args.tune:
        return [
            Cell(arm, TUNE_EPSILON, TUNE_SEED, f, "tune")
            for arm in args.arms
            for f in tune_grid(_tried(done, arm))
        ]
    factors = tuned_factors(done, args.arms)
    return [
        Cell(arm, eps, seed, factors[arm], "study")
        for seed in args.seeds  # seed-major: every arm gets its paired runs early
        for eps in args.epsilons
        for arm in args.arms
    ]


def eta(seconds: float) -> str:
    m = int(round(seconds / 60))
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m"


def sit(args: argparse.Namespace, plan: Plan) -> None:
    """Run every cell that is not in the results file yet, with a progress line. A tuning
    sitting goes on while a strategy's grid grows."""
    everything = load(args.results)
    done = plan.current(everything)
    stale = len(everything) - len(done)
    timed = [r["wall_s"] for r in done.values()]
    failed: set[str] = set()  # not retried in this sitting
    first = True
    while True:
        planned = cells(args, done)
        todo = [c for c in planned if plan.key(c) not in done and plan.key(c) not in failed]
        per_run = float(np.mean(timed)) if timed else DEFAULT_RUN_S
        if first or args.plan:
            more = " (a tuning grid can grow)" if args.tune else ""
            print(
                f"{args.results}: {len(planned) - len(todo)} of {len(planned)} runs done, "
                f"{len(todo)} left{more}, ETA {eta(len(todo) * per_run)}"
                + (f"; {stale} stale lines from earlier code or settings ignored" if stale else ""),
                flush=True,
            )
            first = False
        if args.plan:
            for cell in todo:
                print(
                    f"  to run: {cell.arm} eps={cell.epsilon} seed={cell.seed} lr x{cell.lr_factor}"
                )
            return
        if not todo:
            return
        for i, cell in enumerate(todo):
            per_run = float(np.mean(timed)) if timed else DEFAULT_RUN_S
            left = eta((len(todo) - i) * per_run)
            print(
                f"[{len(planned) - len(todo) + i + 1}/{len(planned)}] {cell.phase} {cell.arm} "
                f"eps={'none' if cell.epsilon is None else f'{cell.epsilon:g}'} seed={cell.seed} "
                f"lr x{cell.lr_factor:g} ({len(todo) - i} left, ETA {left})",
                flush=True,
            )
            key = plan.key(cell)
            row = run_cell(cell, plan.overrides(cell), key, args.runs_dir)
            if row is None:
                failed.add(key)
                continue
            append(args.results, row)
            done[key] = row
            timed.append(row["wall_s"])
            print(
                f"  accuracy {row['accuracy']:.3f}, epsilon {row['epsilon_spent']:.3f}, "
                f"{row['wall_s']:.0f} s",
                flush=True,
            )
        if not args.tune:
            return


# -- the report --------------------------------------------------------------------------------
def report(results: Path, arms: list[str], plan: Plan | None = None, args: Any = None) -> str:
    """The tables and plots from the results file; with a ``plan`` (and the sitting's
    ``args``), only its current lines, and a tuning run that is also a study cell (the best
    factor at epsilon 8, seed 0: the same key) counts as that cell's run."""
    everything = load(results)
    done = plan.current(everything) if plan is not None else everything
    study_keys: set[str] = set()
    if plan is not None and args is not None:
        study = argparse.Namespace(**{**vars(args), "tune": False})
        study_keys = {plan.key(c) for c in cells(study, done)}
    rows = [
        {**r, "phase": "study"} if k in study_keys else r
        for k, r in done.items()
        if r["phase"] == "study" or k in study_keys
    ]
    tune = [r for r in done.values() if r["phase"] == "tune"]
    if not rows:
        raise SystemExit(f"{results}: no study runs yet (run: python bench/strategies.py)")
    out = results.parent
    with (out / "study.csv").open("w", newline="") as fh:
        fields = sorted({k for r in rows for k in r if k not in ("overrides",)})
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cells_: dict[tuple[str, float | None], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:  # the latest run of a (arm, epsilon, seed) wins (e.g. after a retune)
        cells_[(r["arm"], r["epsilon"])][r["seed"]] = r
    order = {a: i for i, a in enumerate(ARMS)}
    keys = sorted(cells_, key=lambda k: (k[1] is None, k[1] or 0, order.get(k[0], 99)))

    def per_mb(r: dict[str, Any]) -> float:  # accuracy per megabyte uploaded per client
        return r["accuracy"] / (r["bytes_up_per_client_round"] * r["rounds"] / 1e6)

    acc_lines = [
        "| ε | strategy | accuracy (95% CI) | vs lora, paired (95% CI) | reading "
        "| ε spent: PLD / RDP | σ | s / round | up kB / client / round | down kB "
        "| aggregation error | per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mb_lines = [
        "| ε | strategy | accuracy per MB uploaded (95% CI) | vs lora, paired (95% CI) | reading |",
        "|---|---|---|---|---|",
    ]
    for key in keys:
        arm, eps = key
        runs = cells_[key]
        base = cells_.get((BASELINE, eps), {})
        acc = t_interval([r["accuracy"] for r in runs.values()])
        mb = t_interval([per_mb(r) for r in runs.values()])
        if arm == BASELINE:
            diff_text = reading = mb_diff_text = mb_reading = "—"
        else:
            diff = paired_difference(
                {s: r["accuracy"] for s, r in runs.items()},
                {s: r["accuracy"] for s, r in base.items()},
            )
            mb_diff = paired_difference(
                {s: per_mb(r) for s, r in runs.items()}, {s: per_mb(r) for s, r in base.items()}
            )
            diff_text, reading = _signed(diff), verdict(diff)
            mb_diff_text, mb_reading = _signed(mb_diff, 2), verdict(mb_diff, "accuracy per MB")
        one = next(iter(runs.values()))
        eps_text = "none" if eps is None else f"{eps:g}"
        spent = (
            "—"
            if eps is None
            else f"{max(r.get('epsilon_pld', r['epsilon_spent']) for r in runs.values()):.3f} / "
            f"{max(r.get('epsilon_rdp', r['epsilon_spent']) for r in runs.values()):.3f}"
        )
        sigma = "—" if one["noise_multiplier"] is None else f"{one['noise_multiplier']:.3f}"
        agg = [r["aggregation_error"] for r in runs.values() if r["aggregation_error"] is not None]
        per_seed = " / ".join(f"{runs[seed]['accuracy']:.2f}" for seed in sorted(runs))
        acc_lines.append(
            f"| {eps_text} | {arm} | {acc.text()} | {diff_text} | {reading} | {spent} | {sigma} "
            f"| {np.mean([r['wall_s_per_round'] for r in runs.values()]):.1f} "
            f"| {np.mean([r['bytes_up_per_client_round'] for r in runs.values()]) / 1e3:,.1f} "
            f"| {np.mean([r['bytes_down_per_client_round'] for r in runs.values()]) / 1e3:,.1f} "
            f"| {f'{np.mean(agg):.2e}' if agg else '—'} "
            f"| {per_seed} |"
        )
        mb_lines.append(f"| {eps_text} | {arm} | {mb.text(2)} | {mb_diff_text} | {mb_reading} |")
    convergence_lines = convergence(cells_, keys)
    pooled_lines = [
        "| strategy | wins / losses against lora | sign test p | median paired difference "
        "| reading |",
        "|---|---|---|---|---|",
    ]
    for arm in [a for a in ARMS if a != BASELINE and any(k[0] == a for k in cells_)]:
        diffs = [
            cells_[(arm, eps)][seed]["accuracy"] - cells_[(BASELINE, eps)][seed]["accuracy"]
            for (a, eps) in keys
            if a == arm and eps is not None
            for seed in sorted(set(cells_[(arm, eps)]) & set(cells_.get((BASELINE, eps), {})))
        ]
        if diffs:
            test = sign_test(diffs)
            pooled_lines.append(
                f"| {arm} | {test.text()} | {np.median(diffs):+.3f} | {sign_verdict(test)} |"
            )
    factors = tuned_factors(done, [a for a in ARMS if a in arms])
    tune_lines = [
        "| strategy | lr factor → final accuracy (ε = 8, seed 0) | chosen |",
        "|---|---|---|",
    ]
    for arm in [a for a in ARMS if a in arms]:
        got = sorted((r["lr_factor"], r["accuracy"]) for r in tune if r["arm"] == arm)
        if got:
            text = ", ".join(f"{f:g}x → {a:.3f}" for f, a in got)
            tune_lines.append(f"| {arm} | {text} | {factors[arm]:g}x |")
    text = "\n".join(
        [
            "### Accuracy",
            *acc_lines,
            "",
            "### Accuracy per megabyte uploaded per client",
            *mb_lines,
            "",
            "### Across privacy levels: every private (ε, seed) pair against lora",
            *pooled_lines,
            "",
            "### Convergence: accuracy by round (mean over seeds)",
            *convergence_lines,
            "",
            "### Learning-rate tuning",
            *tune_lines,
        ]
    )
    (out / "study.md").write_text(text + "\n")
    plots(cells_, out)
    return text


def mean_curve(runs: dict[int, dict[str, Any]]) -> np.ndarray:
    """A cell's accuracy per round, the mean over its seeds (up to the shortest run)."""
    curves = [r["accuracy_by_round"] for r in runs.values()]
    n = min(len(c) for c in curves)
    return np.mean([c[:n] for c in curves], axis=0)


def convergence(
    cells_: dict[tuple[str, float | None], dict[int, dict[str, Any]]],
    keys: list[tuple[str, float | None]],
) -> list[str]:
    """Has training levelled off by the last round? Per cell, the mean accuracy at a few rounds
    and its change over the last three (what decides whether the study needs more rounds)."""
    lines: list[str] = []
    for key in keys:
        mean = mean_curve(cells_[key])
        n = len(mean)
        shown = sorted({max(1, n // 2), max(1, n - 2), n})
        if not lines:
            lines = [
                "| ε | strategy | "
                + " | ".join(f"round {r}" for r in shown)
                + " | change over the last 3 rounds |",
                "|---|---|" + "---|" * len(shown) + "---|",
            ]
        arm, eps = key
        change = mean[-1] - mean[max(0, n - 3)]
        lines.append(
            f"| {'none' if eps is None else f'{eps:g}'} | {arm} | "
            + " | ".join(f"{mean[r - 1]:.3f}" for r in shown)
            + f" | {change:+.3f} |"
        )
    return lines


def _signed(diff: Interval, digits: int = 3) -> str:
    if diff.n < 2:
        return f"{diff.mean:+.{digits}f} (n = {diff.n})"
    return f"{diff.mean:+.{digits}f} [{diff.low:+.{digits}f}, {diff.high:+.{digits}f}]"


def plots(cells_: dict[tuple[str, float | None], dict[int, dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if any(k[0] == a for k in cells_)]
    private = sorted({k[1] for k in cells_ if k[1] is not None})
    x_none = max(private) * 1.8 if private else 1.0

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, arm in enumerate(arms):
        xs, means, below, above = [], [], [], []
        for eps in [*private, None]:
            runs = cells_.get((arm, eps))
            if runs:
                iv = t_interval([r["accuracy"] for r in runs.values()])
                half = 0.0 if iv.n < 2 else iv.half_width
                xs.append((eps if eps is not None else x_none) * (1 + 0.02 * (i - len(arms) / 2)))
                means.append(iv.mean)
                # accuracy lies in [0, 1]: the bar is the interval's part that can be true
                below.append(min(half, iv.mean))
                above.append(min(half, 1.0 - iv.mean))
        ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=arm)
    ax.set_xscale("log")
    ax.set_xticks([*private, x_none], [f"{e:g}" for e in private] + ["none"])
    ax.minorticks_off()
    ax.set_xlabel("ε per client (δ = 1e-5); none = non-private")
    ax.set_ylabel("final test accuracy (mean, 95% CI over seeds)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("Privacy–utility: BBC News, Dirichlet(0.5), 10 clients, 10 rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_epsilon.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {e: m for e, m in zip([*private, None], "os^Dv", strict=False)}
    for i, arm in enumerate(arms):
        color = f"C{i}"
        for eps in [*private, None]:
            runs = cells_.get((arm, eps))
            if runs:
                mb = np.mean([r["bytes_up_per_client_round"] * r["rounds"] for r in runs.values()])
                acc = np.mean([r["accuracy"] for r in runs.values()])
                ax.scatter(mb / 1e6, acc, color=color, marker=markers[eps], s=40)
        ax.scatter([], [], color=color, label=arm)
    for eps, m in markers.items():
        ax.scatter([], [], color="grey", marker=m, label="none" if eps is None else f"ε = {eps:g}")
    ax.set_xscale("log")
    ax.set_xlabel("megabytes uploaded per client over the run")
    ax.set_ylabel("final test accuracy (mean over seeds)")
    ax.set_title("Communication frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)

    low = min(private) if private else None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm in arms:
        runs = cells_.get((arm, low))
        if runs:
            mean = mean_curve(runs)
            ax.plot(range(1, len(mean) + 1), mean, marker=".", label=arm)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title(f"Accuracy per round at ε = {low:g}" if low is not None else "Accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rounds_eps1.png", dpi=120)
    plt.close(fig)

    levels: list[float | None] = [*private, None]
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.6), sharey=True)
    for ax, eps in zip(np.atleast_1d(axes), levels, strict=True):
        for i, arm in enumerate(arms):
            runs = cells_.get((arm, eps))
            if runs:
                mean = mean_curve(runs)
                ax.plot(range(1, len(mean) + 1), mean, marker=".", color=f"C{i}", label=arm)
        ax.set_title("non-private" if eps is None else f"ε = {eps:g}")
        ax.set_xlabel("round")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (mean over seeds)")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file (JSONL)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS, help="the runs' directories")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--epsilons",
        nargs="+",
        default=["1", "3", "8", "none"],
        help="privacy levels: numbers, and 'none' for non-private",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--tune", action="store_true", help="the learning-rate tuning runs")
    parser.add_argument(
        "--plan", action="store_true", help="say what is done and left; run nothing"
    )
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument(
        "--override", nargs="*", default=[], help="more Hydra overrides (part of every key)"
    )
    args = parser.parse_args()
    args.epsilons = [None if e == "none" else float(e) for e in args.epsilons]
    args.setting = [*SETTING, *args.override]
    plan = Plan(args.setting)
    if not args.report:
        sit(args, plan)
    if args.plan or args.tune:
        return
    print(report(args.results, args.arms, plan, args))
    out = args.results.parent
    print(f"\nwrote {out / 'study.md'}, {out / 'study.csv'} and four plots in {out}")


if __name__ == "__main__":
    main()
