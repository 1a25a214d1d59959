"""After an audit run: canary scores -> the one-run lower bounds -> next to the theoretical
epsilon in the summary, a plot, and a verdict (a lower bound above the theory is a privacy bug).

Clients write one file per round (:func:`write_observation`): at each of their canaries'
coordinates, the sum over the round's DP-SGD steps of what the step released (clipped sum plus
noise), with the public numbers a server knows (noise std, steps, trainable sizes). Two
auditors score every canary from them:

* ``released``: the sum over rounds of the releases at its coordinate (a gradient canary in
  the data adds up to ``C`` per step in which it is sampled);
* ``white_box`` (privfed/audit/white_box.py): the same minus the noise a server regenerates
  from the run's config; it catches noise that is not secret.

Both bounds are computed at ``1 - (1 - confidence) / 2`` (Bonferroni over the two auditors),
so the verdict holds at ``confidence``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from privfed.audit.bound import AuditResult, audit
from privfed.audit.canaries import CanaryPlan, canary_plan
from privfed.config import RunConfig
from privfed.privacy.invariants import required

EXIT_AUDIT_FAILED = 3
AUDITORS = ("released", "white_box")


def write_observation(
    audit_dir: Path,
    server_round: int,
    partition_id: int,
    ids: np.ndarray,
    released: np.ndarray,
    noise_std: float,
    steps: int,
    numels: list[int],
) -> None:
    audit_dir.mkdir(parents=True, exist_ok=True)
    path = audit_dir / f"round_{server_round:05d}_client_{partition_id:05d}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        ids=ids,
        released=released,
        noise_std=noise_std,
        steps=steps,
        numels=np.asarray(numels, dtype=np.int64),
        round=server_round,
        client=partition_id,
    )
    tmp.replace(path)  # a re-run of the round (after a resume) replaces, never adds


def read_observations(audit_dir: Path) -> list[dict]:
    out = []
    for path in sorted(audit_dir.glob("round_*_client_*.npz")):
        with np.load(path) as obs:
            out.append({k: obs[k] for k in obs.files})
    return out


def canary_scores(observations: list[dict], canaries: int) -> np.ndarray:
    """The ``released`` auditor: per canary, the sum of the releases at its coordinate (0 if
    never observed)."""
    scores = np.zeros(canaries)
    for obs in observations:
        np.add.at(scores, obs["ids"], obs["released"])
    return scores


def white_box_scores(observations: list[dict], cfg: RunConfig) -> np.ndarray:
    """The ``white_box`` auditor: the releases minus the noise the config lets a server
    regenerate for each (client, round)."""
    from privfed.audit.white_box import regenerated_noise

    plan = _canary_plan(cfg)
    scores = np.zeros(cfg.audit.canaries)
    for obs in observations:
        predicted = regenerated_noise(
            cfg.seed,
            int(obs["client"]),
            int(obs["round"]),
            obs["ids"],
            plan,
            [int(n) for n in obs["numels"]],
            float(obs["noise_std"]),
            int(obs["steps"]),
        )
        np.add.at(scores, obs["ids"], obs["released"] - predicted)
    return scores


def _canary_plan(cfg: RunConfig) -> CanaryPlan:
    plan = canary_plan(cfg)
    if plan is None:  # a record-level audit makes one; a run without it has nothing to score
        raise ValueError("audit.enabled: this run's data has no canaries to score")
    return plan


def theoretical_epsilon(cfg: RunConfig, run_dir: Path) -> float:
    """The largest epsilon spent by a client that holds canaries (each canary is protected by
    its own client's guarantee; the audit tests them all against the weakest)."""
    from privfed.keys import client_id
    from privfed.privacy.backends import server_accountant

    ledger = server_accountant(cfg.privacy, run_dir / "ledger.sqlite")
    owners = range(min(cfg.federation.num_clients, cfg.audit.canaries))
    return max(ledger.spent(client_id(p)) for p in owners)


def finish_audit(cfg: RunConfig, run_dir: Path) -> dict:
    """Score, bound, record in ``summary.json`` and ``audit.json``, plot; exit 3 on a failure."""
    plan = _canary_plan(cfg)
    delta = required(cfg.privacy.delta, "privacy.delta")
    observations = read_observations(run_dir / "audit")
    scores = {
        "released": canary_scores(observations, cfg.audit.canaries),
        "white_box": white_box_scores(observations, cfg),
    }
    each = 1.0 - (1.0 - cfg.audit.confidence) / len(AUDITORS)
    results = {a: audit(scores[a], plan.included, delta, each) for a in AUDITORS}
    theory = theoretical_epsilon(cfg, run_dir)
    lower = max(r.epsilon_lower for r in results.values())
    failed = [a for a in AUDITORS if results[a].epsilon_lower > theory]
    record = {
        "epsilon_theory": theory,
        "epsilon_audit_lower": lower,
        "audit_passed": not failed,
        "audit": {
            "confidence": cfg.audit.confidence,
            "canaries": cfg.audit.canaries,
            "auditors": {a: asdict(results[a]) for a in AUDITORS},
            "delta": delta,
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
    summary["epsilon_audit_lower_by_auditor"] = {a: results[a].epsilon_lower for a in AUDITORS}
    summary_file.write_text(json.dumps(summary, indent=2))
    if cfg.telemetry.plot:
        plot_audit(scores, plan.included, results, theory, run_dir / "audit.png", cfg)
    for a in AUDITORS:
        r = results[a]
        print(
            f"privfed audit ({a}): epsilon_theory {theory:.3f}, epsilon_audit_lower "
            f"{r.epsilon_lower:.3f} ({cfg.audit.confidence:.0%} confidence over both auditors;"
            f" {r.correct}/{r.guesses} guesses right, {r.canaries} canaries)",
            flush=True,
        )
    if failed:
        print(
            f"privfed audit: FAILED ({', '.join(failed)} auditor): the empirical lower bound "
            f"exceeds the theoretical epsilon: {_mechanism(cfg)} under strategy="
            f"{cfg.strategy.name} releases more than its accountant charges (a privacy bug)",
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
    scores: dict[str, np.ndarray],
    included: np.ndarray,
    results: dict[str, AuditResult],
    theory: float,
    path: Path,
    cfg: RunConfig,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), width_ratios=(2, 2, 1.3))
    for ax, auditor in zip(axes[:2], AUDITORS, strict=True):
        s = scores[auditor]
        bins = np.histogram_bin_edges(s, bins=40)
        ax.hist(s[included], bins=bins, alpha=0.6, label="canary in")
        ax.hist(s[~included], bins=bins, alpha=0.6, label="canary out")
        ax.set(xlabel="score (sum of the releases at the canary's coordinate)", ylabel="canaries")
        ax.set_title(
            f"{auditor} auditor" + (": minus config-derived noise" * (auditor == "white_box"))
        )
        ax.legend()
    ax_e = axes[2]
    values = [theory, *(results[a].epsilon_lower for a in AUDITORS)]
    colors = ["tab:blue", *("tab:red" if v > theory else "tab:green" for v in values[1:])]
    bars = ax_e.bar(["theory", *(f"{a}\nlower bound" for a in AUDITORS)], values, color=colors)
    ax_e.bar_label(bars, fmt="%.2f")
    ax_e.set(ylabel="epsilon", title=f"{cfg.audit.confidence:.0%} confidence")
    fig.suptitle(f"One-run privacy audit: {cfg.strategy.name}, {cfg.audit.canaries} canaries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
