"""After an audit run: canary scores -> the one-run lower bound -> next to the theoretical
epsilon in the summary, a plot, and a verdict (a lower bound above the theory is a privacy bug).

Clients write one file per round (:func:`write_observation`): the change of their DP-SGD
output at each of their canaries' coordinates. A canary's score is minus the sum over rounds.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from privfed.audit.bound import AuditResult, audit
from privfed.config import RunConfig

EXIT_AUDIT_FAILED = 3


def write_observation(
    audit_dir: Path, server_round: int, partition_id: int, ids: np.ndarray, deltas: np.ndarray
) -> None:
    audit_dir.mkdir(parents=True, exist_ok=True)
    path = audit_dir / f"round_{server_round:05d}_client_{partition_id:05d}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=ids, deltas=deltas)
    tmp.replace(path)  # a re-run of the round (after a resume) replaces, never adds


def canary_scores(audit_dir: Path, canaries: int) -> np.ndarray:
    """Score per canary: minus the summed change at its coordinate (0 if never observed)."""
    scores = np.zeros(canaries)
    for path in sorted(audit_dir.glob("round_*_client_*.npz")):
        with np.load(path) as obs:
            np.add.at(scores, obs["ids"], -obs["deltas"])
    return scores


def theoretical_epsilon(cfg: RunConfig, run_dir: Path) -> float:
    """The largest epsilon spent by a client that holds canaries (each canary is protected by
    its own client's guarantee; the audit tests them all against the weakest)."""
    from privfed.client.app import client_id
    from privfed.privacy.backends import server_accountant

    ledger = server_accountant(cfg.privacy, run_dir / "ledger.sqlite")
    owners = range(min(cfg.federation.num_clients, cfg.audit.canaries))
    return max(ledger.spent(client_id(p)) for p in owners)


def finish_audit(cfg: RunConfig, run_dir: Path) -> dict:
    """Score, bound, record in ``summary.json`` and ``audit.json``, plot; exit 3 on a failure."""
    from privfed.data.federated import federated_data

    plan = federated_data(cfg).canaries
    assert plan is not None
    scores = canary_scores(run_dir / "audit", cfg.audit.canaries)
    assert cfg.privacy.delta is not None
    result = audit(scores, plan.included, cfg.privacy.delta, cfg.audit.confidence)
    theory = theoretical_epsilon(cfg, run_dir)
    failed = result.epsilon_lower > theory
    record = {
        "epsilon_theory": theory,
        "epsilon_audit_lower": result.epsilon_lower,
        "audit_passed": not failed,
        "audit": {
            **asdict(result),
            "delta": cfg.privacy.delta,
            "strategy": cfg.strategy.name,
            "mechanism": _mechanism(cfg),
            "break_mechanism": cfg.audit.break_mechanism,
            "canary_scale": cfg.audit.canary_scale,
            "seed": cfg.audit.seed,
        },
    }
    (run_dir / "audit.json").write_text(json.dumps(record, indent=2))
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary.update(
        {k: record[k] for k in ("epsilon_theory", "epsilon_audit_lower", "audit_passed")}
    )
    summary_file.write_text(json.dumps(summary, indent=2))
    if cfg.telemetry.plot:
        plot_audit(scores, plan.included, result, theory, run_dir / "audit.png", cfg)
    line = (
        f"privfed audit: epsilon_theory {theory:.3f}, "
        f"epsilon_audit_lower {result.epsilon_lower:.3f}"
        f" ({result.confidence:.0%} confidence; {result.correct}/{result.guesses} guesses right,"
        f" {result.canaries} canaries)"
    )
    print(line, flush=True)
    if failed:
        print(
            f"privfed audit: FAILED: the empirical lower bound exceeds the theoretical epsilon: "
            f"{_mechanism(cfg)} under strategy={cfg.strategy.name} releases more than its "
            f"accountant charges (a privacy bug)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_AUDIT_FAILED)
    return record


def _mechanism(cfg: RunConfig) -> str:
    p = cfg.privacy
    broken = "" if cfg.audit.break_mechanism == "none" else f", broken: {cfg.audit.break_mechanism}"
    return (
        f"DP-SGD (clipping={p.clipping}, C={p.max_grad_norm}, grad_sample_mode="
        f"{p.grad_sample_mode}{broken})"
    )


def plot_audit(
    scores: np.ndarray,
    included: np.ndarray,
    result: AuditResult,
    theory: float,
    path: Path,
    cfg: RunConfig,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(10, 3.8), width_ratios=(2, 1))
    bins = np.histogram_bin_edges(scores, bins=40)
    ax_s.hist(scores[included], bins=bins, alpha=0.6, label="canary in")
    ax_s.hist(scores[~included], bins=bins, alpha=0.6, label="canary out")
    ax_s.set(xlabel="score (minus the change at the canary's coordinate)", ylabel="canaries")
    ax_s.set_title("Canary scores")
    ax_s.legend()
    bars = ax_e.bar(
        ["theory", "audit lower\nbound"],
        [theory, result.epsilon_lower],
        color=["tab:blue", "tab:red" if result.epsilon_lower > theory else "tab:green"],
    )
    ax_e.bar_label(bars, fmt="%.2f")
    ax_e.set(ylabel="epsilon", title=f"{result.confidence:.0%} confidence")
    fig.suptitle(f"One-run privacy audit: {cfg.strategy.name}, {result.canaries} canaries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
