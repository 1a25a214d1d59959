"""The privacy-utility frontier (issue 30): every recipe tuned per epsilon on the public
validation split, then evaluated once on the test split over evaluation seeds.

    python bench/frontier.py                  # tune what is not tuned, evaluate, report
    python bench/frontier.py --plan           # what is done and left, with an ETA; runs nothing
    python bench/frontier.py --report         # the report from the results file alone
    python bench/frontier.py --arms probe prototypes --lengths 128   # a part of the study
    python bench/frontier.py --arms lora ffa_lora fedsvd --epsilons 3 8   # ε = 3, then 8

**The setting.** The default federation (10 clients, BBC News, all-MiniLM-L6-v2): 1,558
training examples over the clients, a public validation split of 222 and a test split of 445,
both fixed (``data.split_seed``), so every seed is evaluated on the same test examples. Epsilon in
{1, 3, 8} (delta 1e-5) and non-private; input lengths 32 and 128 tokens (256 for the head
recipes' frontier).

**Arms** (each a recipe: config, not code; see ARMS below):
* ``probe``: the outside baseline's method inside privfed, a DP linear probe: the head alone on
  the frozen features, zero start, full-batch DP gradient descent, one local step per round,
  FedAvg; tuned over rounds and learning rate.
* ``prototypes``: the head as DP class prototypes, one Gaussian release per client with the
  whole budget, no rounds; nothing to tune.
* ``prototypes_gd``: prototypes with part of the budget, then 20 rounds of DP gradient descent
  from them; tuned over the prototypes' share and the learning rate.
* the adapter strategies (``lora``, ``ffa_lora``, ``fedsvd``, ``fed_sb``, ``fedmentor``,
  ``rqm16``): LoRA r = 8 and the head through the encoder at 32 tokens, 10 rounds, their
  learning rate tuned (0.5x to 8x the privacy mode's default, the grid grown past its edge on
  validation) at one tuning seed, evaluated on the IID partition (a run costs ~7x a head run).
* ``two_stage``: DP prototypes as the head with a share of the budget, then FedSVD's adapters
  and that head by DP-SGD with the rest (``recipe=head_then_adapters``); tuned over the share
  and the learning rate, like the adapter arms otherwise.

**Tuning, the same rule for every arm.** Each setting of the arm's grid runs at the tuning seeds
(100, 101; never an evaluation seed) on the IID partition with ``eval.test=false``: such a run
never evaluates on the test split, so no test number exists for the tuner to read (the tuning
rows carry none, and the selection asserts it). The setting with the best mean final validation
accuracy wins (ties: the first in the grid). The best *arm* at an epsilon is chosen the same way,
by its tuned validation accuracy.

**Evaluation.** The chosen setting runs at evaluation seeds 0-4 on the IID and the Dirichlet(0.5)
partitions with the test split evaluated: these are the reported numbers. The seed is the unit:
the partition, the public initialisation and the DP noise change with it.

**Statistics** (bench/study_stats.py): per cell the mean and Student's t 95% interval over the
seeds; each arm against ``probe`` paired by seed (t-test on the per-seed differences) and against
the outside baseline's reported numbers: Welch's t-test with its spread over its 5 seeds
estimated from its reported min-max (range / 2.326), a one-sample t-test against its mean
without privacy, where it has no spread. Every p value of the report's family is Holm-adjusted,
and a difference is claimed only where the adjusted p < 0.05. The outside baseline ran on
another random split of the same sizes, so a difference to it also carries that split's luck,
which no test here counts: ``probe`` is its method on our split, compared paired by seed.

**Resumable.** Every finished run is one line of ``bench/results/frontier.jsonl`` (in git),
keyed by the sha256 of its composed config (bench/strategies.py's key), with the commit, the
machine's load and its wall time. A rerun skips what is done; the report is rebuilt from it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from strategies import append, composed, key_of, load, run_cli  # noqa: E402
from study_stats import (  # noqa: E402
    LEVEL,
    holm,
    paired_difference,
    sd_from_range,
    t_interval,
    t_test_p,
    welch_margin,
    welch_p,
)

RESULTS = REPO / "bench" / "results" / "frontier.jsonl"
RUNS = REPO / "multirun" / "frontier"
EPSILONS: list[float | None] = [1.0, 3.0, 8.0, None]
TUNING_SEEDS = [100, 101]
EVAL_SEEDS = [0, 1, 2, 3, 4]
PARTITIONS = {
    "iid": ["data.partitioner.name=iid"],
    "dirichlet": ["data.partitioner.name=dirichlet", "data.partitioner.alpha=0.5"],
}
SETTING = ["federation.num_clients=10", "telemetry.progress=false", "telemetry.plot=false"]
# The outside baseline (issue 30): a DP linear probe in numpy, mean test accuracy over 5 seeds
OUTSIDE = {
    32: {1.0: 0.618, 3.0: 0.877, 8.0: 0.919, None: 0.944},
    128: {1.0: 0.700, 3.0: 0.918, 8.0: 0.945, None: 0.968},
}
# ... and its min-max over those 5 seeds, where it reports one (without privacy it has none:
# full-batch gradient descent from zero is the same at every seed, so its mean is exact)
OUTSIDE_RANGE = {
    32: {1.0: (0.592, 0.642), 3.0: (0.863, 0.901), 8.0: (0.914, 0.923)},
    128: {1.0: (0.640, 0.739), 3.0: (0.892, 0.941), 8.0: (0.932, 0.955)},
}
OUTSIDE_SEEDS = 5
TARGETS = {1.0: 0.85, 3.0: 0.93, 8.0: 0.95, None: 0.96}
GD = [  # full-batch DP gradient descent on the head, one local step per round, plain SGD
    "train.sampling=full_batch",
    "train.local_steps=1",
    "train.optimizer=sgd",
    "train.lr_schedule=constant",
]


@dataclass(frozen=True)
class Arm:
    base: list[str]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    lengths: tuple[int, ...] = (32, 128)
    tuning_seeds: tuple[int, ...] = tuple(TUNING_SEEDS)
    partitions: tuple[str, ...] = tuple(PARTITIONS)

    def settings(self) -> list[dict[str, Any]]:
        names = list(self.grid)
        return [dict(zip(names, v, strict=True)) for v in itertools.product(*self.grid.values())]


ARMS: dict[str, Arm] = {
    "probe": Arm(
        ["recipe=head", *GD],
        {"num_rounds": [10, 30, 100], "train.learning_rate": [1.0, 3.0, 10.0]},
        # 256: a converged non-private logistic regression on the cached features reads 0.955-
        # 0.96 on validation at 128 tokens and 0.964 at 256 (explored on validation only), so
        # the 0.96 target, and the outside probe at eps = 8, can only be within reach at 256
        lengths=(32, 128, 256),
    ),
    "prototypes": Arm(
        ["recipe=head", "recipe.prototypes=true", "recipe.prototype_share=1", "num_rounds=0"],
        {},
        lengths=(32, 128, 256),
    ),
    "prototypes_gd": Arm(
        ["recipe=head", "recipe.prototypes=true", "num_rounds=20", *GD],
        {"recipe.prototype_share": [0.5, 0.8], "train.learning_rate": [0.3, 1.0, 3.0]},
        lengths=(128, 256),
    ),
}
for _name, _overrides in {
    "lora": ["strategy=lora"],
    "ffa_lora": ["strategy=ffa_lora"],
    "fedsvd": ["strategy=fedsvd"],
    "fed_sb": ["strategy=fed_sb"],
    "fedmentor": ["strategy=fedmentor"],
    "rqm16": ["strategy=rqm", "strategy.mode=compress", "strategy.levels=16"],
}.items():
    # A run through the encoder costs ~3.5 min here (the head's: ~30 s): one tuning seed, and
    # the IID partition only, where the head recipes have both.
    ARMS[_name] = Arm(
        ["recipe=adapters", "num_rounds=10", *_overrides],
        # 4x: at 2x both LoRA and FFA-LoRA chose the grid's edge at ε = 3; 8x: FFA-LoRA then
        # chose 4x (LoRA collapsed there), so the grid goes one step past it.
        {"lr_factor": [0.5, 1.0, 2.0, 4.0, 8.0]},
        lengths=(32,),
        tuning_seeds=(TUNING_SEEDS[0],),
        partitions=("iid",),
    )
# The two-stage recipe (recipe=head_then_adapters): DP prototypes with a share of the budget as
# the head, then FedSVD's adapters and that head by DP-SGD with the rest, composed in one ledger.
# FedSVD: the adapter strategy with the best tuned validation accuracy at ε = 3 (0.740; FFA-LoRA
# 0.686, LoRA 0.583). Tuned over the prototypes' share and the adapters' learning rate.
ARMS["two_stage"] = Arm(
    ["recipe=head_then_adapters", "strategy=fedsvd", "num_rounds=10"],
    {"recipe.prototype_share": [0.5, 0.8], "lr_factor": [0.5, 1.0, 2.0, 4.0]},
    lengths=(32,),
    tuning_seeds=(TUNING_SEEDS[0],),
    partitions=("iid",),
)
HEAD_ARMS = ["probe", "prototypes", "prototypes_gd"]
ADAPTER_BASELINE = "lora"  # the seed papers' claims are against plain LoRA under DP


@dataclass(frozen=True)
class Run:
    arm: str
    epsilon: float | None
    length: int
    partition: str
    seed: int
    setting: tuple[tuple[str, Any], ...]
    phase: str  # tune | eval

    def overrides(self) -> list[str]:
        arm = ARMS[self.arm]
        privacy = ["privacy=none"] if self.epsilon is None else [f"privacy.epsilon={self.epsilon}"]
        out = [*SETTING, *arm.base, *privacy, *PARTITIONS[self.partition]]
        out += [f"model.max_length={self.length}", f"seed={self.seed}"]
        out.append(f"eval.test={'true' if self.phase == 'eval' else 'false'}")
        for name, value in self.setting:
            if name == "lr_factor":  # a factor of the privacy mode's suggested learning rate
                suggested = composed(out)["privacy"]["suggested_learning_rate"]
                out.append(f"train.learning_rate={suggested * value}")
            else:
                out.append(f"{name}={value}")
        return out


def measure(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {
        "accuracy": summary["final_accuracy"],  # None in a tuning run: never evaluated
        "val_accuracy": summary["final_val_accuracy"],
        "val_by_round": [r["val_accuracy"] for r in rows],
        "epsilon_spent": summary.get("epsilon_spent"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "rounds": summary["rounds_completed"],
        "bytes_up_per_client_round": summary.get("bytes_up_per_client_round"),
        "epsilon_user": summary.get("epsilon_user"),
        "user_noise_multiplier": summary.get("user_noise_multiplier"),
    }


def run(r: Run, key: str) -> dict[str, Any] | None:
    row = run_overrides(r.overrides(), key)
    if row is None:
        return None
    return {
        **row,
        "arm": r.arm,
        "epsilon": r.epsilon,
        "length": r.length,
        "partition": r.partition,
        "seed": r.seed,
        "setting": dict(r.setting),
        "phase": r.phase,
    }


def run_overrides(overrides: list[str], key: str) -> dict[str, Any] | None:
    """One run of the real CLI (bench/strategies.py's), measured as this study reads it."""
    return run_cli(overrides, key, RUNS, measure)


class Study:
    """What is done (the results file) and what each arm's tuning chose."""

    def __init__(self, path: Path = RESULTS) -> None:
        self.path = path
        self.rows = load(path)
        self._keys: dict[Run, str] = {}

    def key(self, r: Run) -> str:
        if r not in self._keys:
            self._keys[r] = key_of(composed(r.overrides()))
        return self._keys[r]

    def done(self, r: Run) -> dict[str, Any] | None:
        return self.rows.get(self.key(r))

    def tuning_runs(self, arm: str, epsilon: float | None, length: int) -> list[Run]:
        return [
            Run(arm, epsilon, length, "iid", seed, tuple(s.items()), "tune")
            for s in ARMS[arm].settings()
            for seed in ARMS[arm].tuning_seeds
        ]

    def tuned(self, arm: str, epsilon: float | None, length: int) -> tuple[dict, float] | None:
        """(setting, mean validation accuracy) chosen on validation, once every tuning run is
        done; the tuner reads validation only (tuning runs have no test number to read)."""
        settings = ARMS[arm].settings()
        if len(settings) == 1:  # nothing to choose: no tuning runs
            return settings[0], self.val_of_eval(arm, epsilon, length, settings[0])
        best: tuple[dict, float] | None = None
        for setting in settings:
            vals = []
            for seed in ARMS[arm].tuning_seeds:
                row = self.done(
                    Run(arm, epsilon, length, "iid", seed, tuple(setting.items()), "tune")
                )
                if row is None:
                    return None
                assert row["accuracy"] is None, "a tuning run evaluated the test split"
                vals.append(row["val_accuracy"])
            mean = float(np.mean(vals))
            if best is None or mean > best[1]:
                best = (setting, mean)
        return best

    def val_of_eval(self, arm: str, epsilon: float | None, length: int, setting: dict) -> float:
        vals = [
            row["val_accuracy"]
            for seed in EVAL_SEEDS
            if (
                row := self.done(
                    Run(arm, epsilon, length, "iid", seed, tuple(setting.items()), "eval")
                )
            )
        ]
        return float(np.mean(vals)) if vals else float("nan")

    def eval_runs(self, arm: str, epsilon: float | None, length: int) -> list[Run]:
        chosen = self.tuned(arm, epsilon, length)
        if chosen is None:
            return []
        setting = tuple(chosen[0].items())
        return [
            Run(arm, epsilon, length, partition, seed, setting, "eval")
            for partition in ARMS[arm].partitions
            for seed in EVAL_SEEDS
        ]


def plan(
    study: Study, arms: list[str], lengths: list[int], epsilons: list[float | None] | None = None
) -> list[Run]:
    """Every run still to do, tuning before evaluation (an evaluation waits for its tuning),
    the epsilons in the order given (default: all of them, 1 first)."""
    todo: list[Run] = []
    for epsilon, arm in itertools.product(epsilons or EPSILONS, arms):  # one epsilon at a time
        for length in ARMS[arm].lengths:
            if lengths and length not in lengths:
                continue
            tuning = (
                [] if len(ARMS[arm].settings()) == 1 else study.tuning_runs(arm, epsilon, length)
            )
            todo += [r for r in tuning if study.done(r) is None]
            todo += [r for r in study.eval_runs(arm, epsilon, length) if study.done(r) is None]
    return todo


def sit(
    study: Study, arms: list[str], lengths: list[int], epsilons: list[float | None] | None = None
) -> None:
    walls = [r["wall_s"] for r in study.rows.values()]
    while True:
        todo = plan(study, arms, lengths, epsilons)
        if not todo:
            break
        r = todo[0]
        mean = float(np.mean(walls[-20:])) if walls else 40.0
        eta = len(todo) * mean / 60
        print(
            f"[{len(study.rows)} done, {len(todo)} planned now, ETA >= {eta:.0f} min] "
            f"{r.phase} {r.arm} eps={r.epsilon} len={r.length} {r.partition} seed={r.seed} "
            f"{dict(r.setting)}",
            flush=True,
        )
        row = run(r, study.key(r))
        if row is None:
            continue
        append(study.path, row)
        study.rows[row["key"]] = row
        walls.append(row["wall_s"])
        shown = f"test {row['accuracy']:.3f}, " if row["accuracy"] is not None else ""
        print(f"  {shown}val {row['val_accuracy']:.3f} in {row['wall_s']:.0f} s", flush=True)


# -- the report ----------------------------------------------------------------------------------
def _eps(e: float | None) -> str:
    return "none" if e is None else f"{e:g}"


def cells(study: Study) -> dict[tuple, dict[int, dict[str, Any]]]:
    """(arm, epsilon, length, partition) -> seed -> evaluation row, for complete tunings."""
    out: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
    for arm, epsilon in itertools.product(ARMS, EPSILONS):
        for length in ARMS[arm].lengths:
            for r in study.eval_runs(arm, epsilon, length):
                row = study.done(r)
                if row is not None:
                    out[(arm, epsilon, length, r.partition)][r.seed] = row
    return out


def outside_sd(length: int, epsilon: float | None) -> float | None:
    """The outside baseline's seed-to-seed standard deviation, read off its reported min-max;
    None where it reports none (its mean is exact)."""
    spread = OUTSIDE_RANGE[length].get(epsilon)
    return None if spread is None else sd_from_range(*spread, OUTSIDE_SEEDS)


def outside_p(accs: list[float], length: int, epsilon: float | None) -> float:
    """The p value of ours against the outside baseline: Welch's t-test with its seed-to-seed
    spread read off its reported min-max where it has one (its mean is a draw too), else a
    one-sample t-test against its exact mean."""
    mean, sd = OUTSIDE[length][epsilon], outside_sd(length, epsilon)
    if sd is None:
        return t_test_p(accs, mean)
    return welch_p(accs, mean, sd, OUTSIDE_SEEDS)


def outside_margin(accs: list[float], length: int, epsilon: float | None, alpha: float) -> float:
    """The smallest lead over the outside baseline that :func:`outside_p`'s test would call
    real at level ``alpha``, with our seeds' spread as it is (the test's t and degrees of
    freedom do not depend on the means)."""
    sd = outside_sd(length, epsilon)
    if sd is None:
        return welch_margin(accs, 0.0, 0, alpha)
    return welch_margin(accs, sd, OUTSIDE_SEEDS, alpha)


def report(study: Study) -> str:
    got = cells(study)
    lines = [
        "# The privacy-utility frontier (bench/frontier.py)",
        "",
        f"{len(study.rows)} runs. Test accuracy, mean over evaluation seeds with its 95% "
        "interval (n = seeds). Every setting chosen on the validation split at tuning seeds; "
        "'val (selection)' is what the choice read: the tuning seeds' mean final validation "
        "accuracy (an arm with nothing to tune: its evaluation seeds' validation accuracy).",
        "",
    ]
    # the family of comparisons: every arm vs probe (paired), every arm vs the outside baseline,
    # every adapter strategy vs LoRA (paired)
    family: dict[tuple, float] = {}
    for (arm, eps, length, part), runs in got.items():
        accs = {s: r["accuracy"] for s, r in runs.items()}
        lora = got.get((ADAPTER_BASELINE, eps, length, part))
        if arm not in HEAD_ARMS and arm != ADAPTER_BASELINE and lora:
            base = {s: r["accuracy"] for s, r in lora.items()}
            seeds = sorted(set(accs) & set(base))
            family[(ADAPTER_BASELINE, arm, eps, length, part)] = t_test_p(
                [accs[s] - base[s] for s in seeds]
            )
        if arm != "probe" and (probe := got.get(("probe", eps, length, part))):
            base = {s: r["accuracy"] for s, r in probe.items()}
            seeds = sorted(set(accs) & set(base))
            family[("probe", arm, eps, length, part)] = t_test_p([accs[s] - base[s] for s in seeds])
        if length in OUTSIDE:
            family[("outside", arm, eps, length, part)] = outside_p(
                list(accs.values()), length, eps
            )
    adjusted = holm(family)
    for part in PARTITIONS:
        lines += [f"## {part}", ""]
        lengths = sorted({k[2] for k in got if k[3] == part})
        for length in lengths:
            lines += [
                f"### {length} tokens",
                "",
                "| ε | arm | setting (chosen on validation) | val (selection) | test "
                "| vs probe (Holm p) | vs outside (Holm p) |",
                "|---|---|---|---|---|---|---|",
            ]
            for eps in EPSILONS:
                for arm in ARMS:
                    runs = got.get((arm, eps, length, part))
                    if not runs:
                        continue
                    accs = [r["accuracy"] for r in runs.values()]
                    chosen = study.tuned(arm, eps, length)
                    setting = ", ".join(
                        f"{k}={v}" for k, v in (chosen[0] if chosen else {}).items()
                    )
                    val = f"{chosen[1]:.3f}" if chosen and not np.isnan(chosen[1]) else "—"
                    vs_probe = "—"
                    if ("probe", arm, eps, length, part) in family:
                        probe = got[("probe", eps, length, part)]
                        diff = paired_difference(
                            {s: r["accuracy"] for s, r in runs.items()},
                            {s: r["accuracy"] for s, r in probe.items()},
                        )
                        p = adjusted[("probe", arm, eps, length, part)]
                        vs_probe = f"{diff.mean:+.3f} ({_p(p)})"
                    vs_out = "—"
                    if ("outside", arm, eps, length, part) in family:
                        p = adjusted[("outside", arm, eps, length, part)]
                        vs_out = f"{np.mean(accs) - OUTSIDE[length][eps]:+.3f} ({_p(p)})"
                    lines.append(
                        f"| {_eps(eps)} | {arm} | {setting or '—'} | {val} | "
                        f"{_text(accs)} | {vs_probe} | {vs_out} |"
                    )
            lines.append("")
    lines += adapter_lines(got, family, adjusted)
    lines += outside_lines(study, got, adjusted)
    lines += frontier_lines(study, got)
    return "\n".join(lines) + "\n"


def adapter_lines(got: dict, family: dict, adjusted: dict) -> list[str]:
    """Each adapter strategy against LoRA, paired by seed: the seed papers' claims under DP
    (FFA-LoRA, FedSVD better than LoRA), in the report's Holm family."""
    keys = sorted(k for k in family if k[0] == ADAPTER_BASELINE)
    if not keys:
        return []
    lines = [
        f"## The adapter strategies against {ADAPTER_BASELINE}, paired by seed",
        "",
        "Upload: what a client sends per round (its reply's tensors), the mean over its runs, "
        "and that over LoRA's (Fed-SB's claim is far less communication).",
        "",
        "| ε | length, partition | strategy | test | its difference to LoRA (Holm p) | upload per "
        "client-round (× LoRA's) |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(keys, key=lambda k: (_epsilon_order(k[2]), k[3], k[4], k[1])):
        _, arm, eps, length, part = key
        ours = {s: r["accuracy"] for s, r in got[(arm, eps, length, part)].items()}
        base = {s: r["accuracy"] for s, r in got[(ADAPTER_BASELINE, eps, length, part)].items()}
        diff = paired_difference(ours, base)
        up = _upload(got[(arm, eps, length, part)])
        up_base = _upload(got[(ADAPTER_BASELINE, eps, length, part)])
        upload = (
            "—" if up is None or up_base is None else f"{up / 1e3:.1f} kB (×{up / up_base:.2f})"
        )
        lines.append(
            f"| {_eps(eps)} | {length}, {part} | {arm} | {_text(list(ours.values()))} | "
            f"{diff.mean:+.3f} (n = {diff.n}, {_p(adjusted[key])}) | {upload} |"
        )
    return [*lines, ""]


def _upload(runs: dict[int, dict]) -> float | None:
    """Mean bytes a client uploads per round over ``runs`` (seed -> row); None where a row
    does not say."""
    sent = [r.get("bytes_up_per_client_round") for r in runs.values()]
    return None if any(b is None for b in sent) else float(np.mean(sent))


def _epsilon_order(eps: float | None) -> float:
    return float("inf") if eps is None else eps


def _text(values: list[float]) -> str:
    """Mean ± half the 95% interval, and n."""
    interval = t_interval(values)
    return interval.text() + (f" (n = {interval.n})" if interval.n >= 2 else "")


def _p(p: float) -> str:
    if np.isnan(p):
        return "p n/a"
    return f"p = {p:.3f}" + (", real" if p < 0.05 else "")


def best_arm(
    study: Study, got: dict, eps: float | None, length: int | None = None
) -> tuple[str, int, dict, float] | None:
    """The frontier's recipe at ``eps`` (at ``length``, or any): of the arms evaluated there
    (IID), the one whose tuned validation accuracy is highest (ties: the first found); (arm,
    length, its setting, that validation accuracy)."""
    best = None
    for arm, e, at, part in got:
        if e != eps or part != "iid" or (length is not None and at != length):
            continue
        chosen = study.tuned(arm, eps, at)
        if chosen is None or np.isnan(chosen[1]):
            continue
        if best is None or chosen[1] > best[3]:
            best = (arm, at, *chosen)
    return best


def outside_lines(study: Study, got: dict, adjusted: dict) -> list[str]:
    """Our best arm at each length and epsilon (chosen on validation) against the outside
    baseline at that length, and the lead its test would need: alone at 5%, and at the family's
    strictest Holm step (5% / the family's size). Where the outside baseline's own seed-to-seed
    spread makes the second lead unreachable (a mean above 1), no recipe can show a win in this
    family, however good, and the report says so rather than leaving "p = 1.000" to speak."""
    m = sum(1 for p in adjusted.values() if not np.isnan(p))
    alpha = 1 - LEVEL
    lines = [
        "## Against the outside baseline: what a shown win would need",
        "",
        f"Our best arm per length and ε (chosen on validation) against the outside baseline; "
        f"'needs' is the mean its test (Welch's with the baseline's spread, or one-sample where "
        f"it has none) would call better, with our seeds' spread as measured: alone at "
        f"{alpha:.0%}, and in the report's family of {m} comparisons at Holm's strictest step "
        f"({alpha:.0%} / {m}).",
        "",
        "| ε | length, partition | best arm | test | outside (its sd) | needs alone "
        "| needs in the family | shown (Holm p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for eps, length, part in itertools.product(EPSILONS, sorted(OUTSIDE), PARTITIONS):
        best = best_arm(study, got, eps, length)
        if best is None or (best[0], eps, length, part) not in got:
            continue
        arm = best[0]
        accs = [r["accuracy"] for r in got[(arm, eps, length, part)].values()]
        theirs = OUTSIDE[length][eps]
        spread = outside_sd(length, eps)
        sd = "exact" if spread is None else f"{spread:.3f}"
        needs = [theirs + outside_margin(accs, length, eps, a) for a in (alpha, alpha / m)]
        shown = [
            "—" if np.isnan(x) else f"{x:.3f}" + (" (unreachable)" if x > 1 else "") for x in needs
        ]
        p = adjusted.get(("outside", arm, eps, length, part), math.nan)
        verdict = f"{'yes' if p < alpha else 'no'} ({_p(p)})"
        if np.isnan(p):  # no spread on either side (non-private, deterministic): the means say it
            verdict = "yes (above it)" if np.mean(accs) > theirs else "no (below it)"
        lines.append(
            f"| {_eps(eps)} | {length}, {part} | {arm} | {_text(accs)} | {theirs:.3f} ({sd}) "
            f"| {shown[0]} | {shown[1]} | {verdict} |"
        )
    return [*lines, ""]


def frontier_lines(study: Study, got: dict) -> list[str]:
    """The best arm per epsilon, chosen by its tuned validation accuracy, and its test."""
    lines = [
        "## The frontier: the best arm per ε (chosen on validation), against the targets",
        "",
        "| ε | best arm, length | val (selection) | test, IID | test, Dirichlet(0.5) | target "
        "| met |",
        "|---|---|---|---|---|---|---|",
    ]
    for eps in EPSILONS:
        best = best_arm(study, got, eps)
        if best is None:
            continue
        arm, length, _, val = best
        iid = [r["accuracy"] for r in got[(arm, eps, length, "iid")].values()]
        dirichlet = [r["accuracy"] for r in got.get((arm, eps, length, "dirichlet"), {}).values()]
        target = TARGETS[eps]
        met = [  # unrounded: a mean of 0.9495 shows as 0.950 but misses 0.95
            f"{name} {'yes' if np.mean(values) >= target else 'no'} ({np.mean(values):.4f})"
            for name, values in (("IID", iid), ("Dirichlet", dirichlet))
            if values
        ]
        lines.append(
            f"| {_eps(eps)} | {arm}, {length} | {val:.3f} | {_text(iid)} | "
            f"{_text(dirichlet) if dirichlet else '—'} | {target} | {', '.join(met)} |"
        )
    return lines + [""]


def plot(study: Study, path: Path) -> None:
    """Test accuracy against epsilon, one panel per input length (IID), a line per arm with its
    95% interval, the outside baseline dashed and the targets as red ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = cells(study)
    lengths = sorted({k[2] for k in got if k[3] == "iid"})
    if not lengths:
        return
    xs = {e: i for i, e in enumerate(EPSILONS)}
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for arm in ARMS:
            points = [
                (xs[e], t_interval([r["accuracy"] for r in runs.values()]))
                for (a, e, n, part), runs in got.items()
                if a == arm and n == length and part == "iid"
            ]
            if not points:
                continue
            points.sort(key=lambda p: p[0])
            ax.errorbar(
                [x for x, _ in points],
                [i.mean for _, i in points],
                yerr=[0 if np.isnan(i.half_width) else i.half_width for _, i in points],
                marker="o",
                capsize=3,
                label=arm,
            )
        if length in OUTSIDE:
            ax.plot(
                list(xs.values()),
                [OUTSIDE[length][e] for e in EPSILONS],
                "k--",
                marker="x",
                label="outside DP probe",
            )
        for e, x in xs.items():
            ax.plot([x - 0.15, x + 0.15], [TARGETS[e]] * 2, color="red", lw=2)
        ax.set_xticks(list(xs.values()), [_eps(e) for e in EPSILONS])
        ax.set(xlabel="ε (δ = 1e-5)", ylabel="test accuracy", title=f"{length} tokens, IID")
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("privacy-utility frontier (5 seeds, 95% intervals; red: targets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _epsilon(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if value not in EPSILONS:
        raise argparse.ArgumentTypeError(f"{text}: the study's epsilons are 1, 3, 8 and none")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="*", default=HEAD_ARMS, choices=list(ARMS))
    p.add_argument("--lengths", nargs="*", type=int, default=[])
    p.add_argument(
        "--epsilons",
        nargs="*",
        type=_epsilon,
        default=[],
        help="a part of the study, in this order: 1 3 8 none (default: all, 1 first)",
    )
    p.add_argument("--plan", action="store_true")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    study = Study()
    if args.plan:
        todo = plan(study, args.arms, args.lengths, args.epsilons)
        walls = [r["wall_s"] for r in study.rows.values()]
        mean = float(np.mean(walls)) if walls else 40.0
        print(f"{len(study.rows)} runs done; {len(todo)} planned now (more once tunings finish)")
        print(f"at {mean:.0f} s a run: >= {len(todo) * mean / 3600:.1f} h")
        return
    if not args.report:
        sit(study, args.arms, args.lengths, args.epsilons)
    text = report(study)
    (RESULTS.parent / "frontier.md").write_text(text)
    plot(study, RESULTS.parent / "frontier_accuracy.png")
    print(text)


if __name__ == "__main__":
    main()
