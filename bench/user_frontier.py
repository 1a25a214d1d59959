"""User-level DP (DP-FedAvg) with the head recipe: when does it start to learn on BBC News?

    python bench/user_frontier.py            # tune what is not tuned, evaluate, report
    python bench/user_frontier.py --plan     # done / planned now, runs nothing
    python bench/user_frontier.py --report   # the report from the results file alone

The earlier user-level study (bench/user_level.py: LoRA, ~79,000 numbers per update, one seed,
untuned) found no private arm learning at N = 100 or 1,000 devices. Its explanation, the noise
on the mean update ``sigma sqrt(d) / (q N)`` times C, was not tested against the alternatives.
This study tests it with controls:

* **the head recipe**: each device trains the linear head on its frozen features (d = 1,925
  numbers, sqrt(d) 6.4x smaller than LoRA's) with 5 local SGD steps at learning rate 1;
* **arms** at each population N (IID over the 1,558 training articles, q = 0.1 of them per
  round, 20 rounds): ``dp`` (DP-FedAvg at epsilon 1, 3, 8, delta 1e-5); ``clip_only`` (the same
  clipping and server step, sigma 0: no guarantee, the control that separates the clipping's
  cost from the noise's); ``none`` (FedAvg of the same devices, q N of them a round, no clipping);
* **tuned on validation**: the clip norm C and the server learning rate, over the grid below,
  at tuning seed 100 with ``eval.test=false`` (no test number exists in a tuning run); then
  evaluation seeds 0, 1, 2 with the test split;
* **the axis**: N in {100, 1,558} (about 16 and 1 article per device): effective devices per
  round q N = 10 and 156.

Each run is the real CLI; results in ``bench/results/user_frontier.jsonl`` (in git), resumable
and keyed by the composed config, as bench/frontier.py.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import frontier  # noqa: E402
from strategies import append, composed, key_of, load  # noqa: E402
from study_stats import t_interval  # noqa: E402

RESULTS = REPO / "bench" / "results" / "user_frontier.jsonl"
POPULATIONS = [100, 1558]
SAMPLING = 0.1
ROUNDS = 20
EPSILONS = [1.0, 3.0, 8.0]
GRID = {"privacy.user.clip_norm": [0.1, 0.5], "privacy.user.server_learning_rate": [1.0, 3.0, 10.0]}
TUNING_SEEDS = [100]
EVAL_SEEDS = [0, 1, 2]
DEVICE = [  # what a device does with its own examples, the same in every arm
    "recipe=head",
    "model.max_length=128",
    "train.optimizer=sgd",
    "train.learning_rate=1.0",
    "train.lr_schedule=constant",
    "train.local_steps=5",
    "train.weighting=uniform",
]


@dataclass(frozen=True)
class Cell:
    arm: str  # dp | clip_only | none
    population: int
    epsilon: float | None
    seed: int
    setting: tuple[tuple[str, Any], ...]
    phase: str

    def overrides(self) -> list[str]:
        per_round = max(1, round(SAMPLING * self.population))
        out = [
            *frontier.SETTING,
            *DEVICE,
            f"federation.num_clients={self.population}",
            f"federation.clients_per_round={per_round}",
            f"num_rounds={ROUNDS}",
            "data.partitioner.name=iid",
            f"seed={self.seed}",
            f"eval.test={'true' if self.phase == 'eval' else 'false'}",
        ]
        if self.arm == "dp":
            out += ["privacy=user", f"privacy.user.epsilon={self.epsilon}"]
        elif self.arm == "clip_only":
            out += ["privacy=user", "privacy.user.noise_multiplier=0"]
        else:
            out += ["privacy=none"]
        return out + [f"{k}={v}" for k, v in self.setting]


def settings(arm: str) -> list[dict[str, Any]]:
    if arm == "none":
        return [{}]
    names = list(GRID)
    return [dict(zip(names, v, strict=True)) for v in itertools.product(*GRID.values())]


class Study:
    def __init__(self) -> None:
        self.rows = load(RESULTS)
        self._keys: dict[Cell, str] = {}

    def key(self, c: Cell) -> str:
        if c not in self._keys:
            self._keys[c] = key_of(composed(c.overrides()))
        return self._keys[c]

    def done(self, c: Cell) -> dict[str, Any] | None:
        return self.rows.get(self.key(c))

    def tuned(self, arm: str, n: int, eps: float | None) -> tuple[dict, float] | None:
        options = settings(arm)
        if len(options) == 1:
            return options[0], float("nan")
        best = None
        for s in options:
            rows = [
                self.done(Cell(arm, n, eps, seed, tuple(s.items()), "tune"))
                for seed in TUNING_SEEDS
            ]
            if any(r is None for r in rows):
                return None
            assert all(r["accuracy"] is None for r in rows if r), "a tuning run saw the test split"
            mean = float(np.mean([r["val_accuracy"] for r in rows if r]))
            if best is None or mean > best[1]:
                best = (s, mean)
        return best

    def plan(self) -> list[Cell]:
        todo: list[Cell] = []
        arms = [("dp", e) for e in EPSILONS] + [("clip_only", None), ("none", None)]
        for n, (arm, eps) in itertools.product(POPULATIONS, arms):
            if len(settings(arm)) > 1:
                for s in settings(arm):
                    for seed in TUNING_SEEDS:
                        c = Cell(arm, n, eps, seed, tuple(s.items()), "tune")
                        if self.done(c) is None:
                            todo.append(c)
            chosen = self.tuned(arm, n, eps)
            if chosen is not None:
                for seed in EVAL_SEEDS:
                    c = Cell(arm, n, eps, seed, tuple(chosen[0].items()), "eval")
                    if self.done(c) is None:
                        todo.append(c)
        return todo


def sit(study: Study) -> None:
    while todo := study.plan():
        c = todo[0]
        print(
            f"[{len(study.rows)} done, {len(todo)} planned now] {c.phase} {c.arm} "
            f"N={c.population} eps={c.epsilon} seed={c.seed} {dict(c.setting)}",
            flush=True,
        )
        row = frontier.run_overrides(c.overrides(), study.key(c))
        if row is None:
            continue
        row.update(
            {
                "arm": c.arm,
                "population": c.population,
                "epsilon": c.epsilon,
                "seed": c.seed,
                "setting": dict(c.setting),
                "phase": c.phase,
            }
        )
        append(RESULTS, row)
        study.rows[row["key"]] = row
        shown = f"test {row['accuracy']:.3f}, " if row["accuracy"] is not None else ""
        print(f"  {shown}val {row['val_accuracy']:.3f} in {row['wall_s']:.0f} s", flush=True)


def report(study: Study) -> str:
    lines = [
        "# User-level DP with the head recipe (bench/user_frontier.py)",
        "",
        "Test accuracy over evaluation seeds (95% interval); C and the server learning rate "
        "chosen on validation. q = 0.1, 20 rounds, d = 1,925. The noise on the mean update is "
        "sigma sqrt(d) / (q N) times C.",
        "",
        "| N (devices a round) | arm | ε | C, server lr (chosen on validation) | σ "
        "| noise on the mean update ÷ C | test |",
        "|---|---|---|---|---|---|---|",
    ]
    got: dict[tuple, list[dict]] = defaultdict(list)
    for row in study.rows.values():
        if row["phase"] == "eval":
            got[(row["population"], row["arm"], row["epsilon"])].append(row)
    for n in POPULATIONS:
        for arm, eps in [("none", None), ("clip_only", None)] + [("dp", e) for e in EPSILONS]:
            rows = got.get((n, arm, eps))
            if not rows:
                continue
            chosen = study.tuned(arm, n, eps)
            setting = ", ".join(f"{v:g}" for v in (chosen[0] if chosen else {}).values()) or "—"
            sigma = rows[0].get("user_noise_multiplier")
            noise = "—"
            if sigma:
                noise = f"{sigma * np.sqrt(1925) / (SAMPLING * n):.2f}"
            elif arm == "clip_only":
                noise = "0"
            accs = [r["accuracy"] for r in rows]
            lines.append(
                f"| {n} ({round(SAMPLING * n)}) | {arm} | {eps if eps else '—'} | {setting} | "
                f"{f'{sigma:.3f}' if sigma else '—'} | {noise} | "
                f"{t_interval(accs).text()} (n = {len(accs)}) |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", action="store_true")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    study = Study()
    if args.plan:
        print(f"{len(study.rows)} runs done; {len(study.plan())} planned now")
        return
    if not args.report:
        sit(study)
    text = report(study)
    (RESULTS.parent / "user_frontier.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
