"""The user-level audit's verdict: the canary devices' scores against ``epsilon_user``
(the canaries themselves: :mod:`privfed.audit.user_canaries`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from privfed.audit.bound import audit
from privfed.audit.canaries import CanaryPlan
from privfed.audit.user_canaries import OBSERVATIONS
from privfed.config import RunConfig


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
