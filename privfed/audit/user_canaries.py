"""The one-run audit of user-level DP: canary *devices* instead of canary records.

Canary j is an extra device of the population, present with probability 1/2 (the same secret
bits as the record-level audit, from ``audit.seed``). A present canary is Poisson-sampled like
every device (rate q, from a secret stream the auditor never sees) and, when sampled, sends an
update of ``canary_scale * C`` on one coordinate of the payload (its own, distinct: a Dirac
canary) and zero elsewhere. The server clips it to C and adds it to the round's sum before the
noise, exactly as a real device's update: DP-FedAvg cannot tell them apart.

What the auditor observes is what user-level DP protects: each round's release minus the
broadcast. Canary j's score is the sum over rounds of that at its coordinate. A mechanism that
is (epsilon, delta)-DP per device cannot let the auditor tell present canaries from absent ones
better than :mod:`privfed.audit.bound` allows; the audit passes when its lower bound stays
under the population's epsilon (the run's ``epsilon_user``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from privfed.audit.bound import audit
from privfed.audit.canaries import CanaryPlan
from privfed.config import RunConfig
from privfed.randomness import RandomStream

State = dict[str, torch.Tensor]
OBSERVATIONS = "user_round_*.npy"


class UserCanaries:
    """The server's side of a user-level audit: the canary devices' updates each round, and
    what the auditor observes of each release."""

    def __init__(self, cfg: RunConfig, reference: State, audit_dir: Path) -> None:
        from privfed.privacy.calibration import user_sampling_rate

        self.plan = CanaryPlan(cfg.audit, cfg.federation.num_clients)
        self.names = sorted(reference)
        tensor, offset = self.plan.coordinates([reference[n].numel() for n in self.names])
        self.tensor, self.offset = tensor, offset
        self.rate = user_sampling_rate(cfg)
        self.scale = cfg.audit.canary_scale
        self.audit_dir = audit_dir

    def updates(self, reference: State, clip_norm: float) -> list[State]:
        """This round's sampled present canaries' updates (over C: the server clips them)."""
        present = np.flatnonzero(self.plan.included)
        picked = RandomStream.secret("audit.user_canary_sampling").bernoulli(
            len(present), self.rate
        )
        out = []
        for j in present[picked.numpy()]:
            update = {n: torch.zeros(reference[n].shape, dtype=torch.float64) for n in self.names}
            update[self.names[self.tensor[j]]].view(-1)[int(self.offset[j])] = (
                self.scale * clip_norm
            )
            out.append(update)
        return out

    def observe(self, server_round: int, released: State, reference: State) -> None:
        """The release minus the broadcast at every canary's coordinate, one file per round (a
        replayed round replaces its file)."""
        flat = [(released[n].double() - reference[n].double()).reshape(-1) for n in self.names]
        values = np.array(
            [float(flat[t][o]) for t, o in zip(self.tensor, self.offset, strict=True)]
        )
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        path = self.audit_dir / f"user_round_{server_round:05d}.npy"
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, values)
        tmp.replace(path)


def user_scores(audit_dir: Path, canaries: int) -> np.ndarray:
    """Per canary, the sum over rounds of the release at its coordinate."""
    total = np.zeros(canaries)
    for path in sorted(audit_dir.glob(OBSERVATIONS)):
        total += np.load(path)
    return total


def finish_user_audit(cfg: RunConfig, run_dir: Path) -> dict:
    """Score, bound against ``epsilon_user``, record in ``summary.json`` and ``audit.json``;
    exit 3 when the empirical lower bound exceeds the accounted epsilon."""
    from privfed.audit.report import EXIT_AUDIT_FAILED

    plan = CanaryPlan(cfg.audit, cfg.federation.num_clients)
    scores = user_scores(run_dir / "audit", cfg.audit.canaries)
    delta = cfg.privacy.user.delta
    result = audit(scores, plan.included, delta, cfg.audit.confidence)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text())
    theory = float(summary["epsilon_user"])
    passed = result.epsilon_lower <= theory
    record = {
        "unit": "user",
        "epsilon_theory": theory,
        "epsilon_audit_lower": result.epsilon_lower,
        "audit_passed": passed,
        "audit": {
            "confidence": cfg.audit.confidence,
            "canaries": cfg.audit.canaries,
            "guesses": result.guesses,
            "correct": result.correct,
            "delta": delta,
            "strategy": cfg.strategy.name,
            "mechanism": "DP-FedAvg (user level)",
            "break_mechanism": cfg.audit.break_mechanism,
            "canary_scale": cfg.audit.canary_scale,
            "seed": cfg.audit.seed,
        },
    }
    (run_dir / "audit.json").write_text(json.dumps(record, indent=2))
    summary.update(
        {k: record[k] for k in ("epsilon_theory", "epsilon_audit_lower", "audit_passed")}
    )
    summary_file.write_text(json.dumps(summary, indent=2))
    print(
        f"privfed audit (user level, canary devices): epsilon_user {theory:.3f}, "
        f"epsilon_audit_lower {result.epsilon_lower:.3f} ({cfg.audit.confidence:.0%} confidence; "
        f"{result.correct}/{result.guesses} guesses right, {result.canaries} canaries)",
        flush=True,
    )
    if not passed:
        print(
            "privfed audit: FAILED: the empirical lower bound exceeds the user-level epsilon: "
            f"DP-FedAvg under strategy={cfg.strategy.name} releases more than its accountant "
            "charges (a privacy bug)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_AUDIT_FAILED)
    return record
