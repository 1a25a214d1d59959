"""What a run reports: its metrics line per round, its summary, and its last words.

Pure functions of what the round loop (server/loop.py) measured; no Flower, no training.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import log

from privfed import keys
from privfed.config import RunConfig
from privfed.keys import client_id
from privfed.strategies.base import RoundOutcome
from privfed.telemetry.memory import process_tree_rss_mb


def round_row(
    rnd: int,
    out: RoundOutcome,
    evaluation: tuple[float | None, float | None],
    spent: dict[str, float],
    eps_target: float | None,
    sigma: float | None,
    times: tuple[float, float],
    strategy_metrics: dict[str, Any],
) -> dict[str, Any]:
    """One line of metrics.jsonl. ``evaluation``: (accuracy, loss) of the new global model on
    the test split (None, None: not evaluated, eval.test=false); ``spent``: epsilon per client;
    ``times``: (train, wall) seconds of the round."""
    accuracy, loss = evaluation
    train_s, wall_s = times
    return {
        "round": rnd,
        "accuracy": accuracy,
        "loss": loss,
        "train_loss": out.train_loss if np.isfinite(out.train_loss) else None,
        "epsilon_max": max(spent.values(), default=0.0),
        "epsilon_mean": float(np.mean(list(spent.values()))) if spent else 0.0,
        "epsilon_target": eps_target,
        "noise_multiplier": sigma,
        "clients_sampled": out.sampled,
        "clients_trained": out.trained,
        "clients_sat_out": out.sat_out,
        # why, where a client said: its device refused, its budget is spent, the round was in
        # progress elsewhere, or the accountant did not answer
        **{f"clients_{reason.replace('-', '_')}": n for reason, n in out.sat_out_reasons.items()},
        "clients_rejected": out.rejected,
        "clients_failed": out.failed,
        "bytes_down": out.bytes_down,
        "bytes_up": out.bytes_up,
        # per client that was sent a message / that replied (the sizes differ by strategy)
        "bytes_down_per_client": out.bytes_down / max(1, out.sampled),
        "bytes_up_per_client": out.bytes_up / max(1, out.sampled - out.failed),
        "train_time_s": train_s,
        "client_train_time_s": sum(out.client_train_time_s),
        "wall_time_s": wall_s,
        "memory_rss_mb": process_tree_rss_mb(),
        **out.extra,
        **strategy_metrics,
    }


# How many devices were sampled, answered or sent bytes in a round is data-independent under
# record-level DP, but under user-level DP it says whether one more device took part (Poisson
# sampling: Bin(N-1, q) + Bernoulli(q) against Bin(N-1, q)), which no epsilon accounts for. So
# does anything per device: the bytes per device (fixed tensors go to a device once, so the
# bytes say how many devices were new), and the record-level epsilon (a device spends only in
# the rounds it was sampled). These fields are withheld (null) from every output of a
# user-level run; the record-level guarantee is reported as its public bound instead
# (``epsilon_record_bound``: every round at the run's sigma), and each device keeps its own.
WITHHELD_UNDER_USER_DP = (
    "clients_sampled",
    "clients_trained",
    "clients_sat_out",
    "clients_rejected",
    "clients_failed",
    "bytes_down",
    "bytes_up",
    "bytes_down_per_client",
    "bytes_up_per_client",
    "client_train_time_s",
    "epsilon_max",
    "epsilon_mean",
)


def withhold_counts(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the per-round counts of a user-level run set to null (see above)."""
    return {
        k: None if k in WITHHELD_UNDER_USER_DP or k.startswith("clients_") else v
        for k, v in row.items()
    }


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of a figure over the rounds; None if any round withheld it."""
    values = [r.get(key) for r in rows]
    present = [float(v) for v in values if v is not None]
    if len(present) < len(values):
        return None
    return float(np.mean(present)) if present else 0.0


def _total(rows: list[dict[str, Any]], key: str) -> int | None:
    """The sum of a count over the rounds; None if any round withheld it."""
    values = [r.get(key) for r in rows]
    return None if any(v is None for v in values) else int(sum(v for v in values if v is not None))


def run_summary(
    cfg: RunConfig,
    run_id: str,
    rows: list[dict[str, Any]],
    eps_target: float | None,
    sigma: float | None,
) -> dict[str, Any]:
    """summary.json: the run in figures, from its metrics lines."""
    last = rows[-1] if rows else {}
    tested = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    validated = [r["val_accuracy"] for r in rows if r.get("val_accuracy") is not None]
    return {
        "run_id": run_id,
        "strategy": cfg.strategy.name,
        "recipe": cfg.recipe.name,
        # test: the reported number (None when the run never evaluated on test: a tuning run)
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "best_accuracy": max(tested, default=None),
        # validation: what selections read
        "final_val_accuracy": last.get("val_accuracy"),
        "best_val_accuracy": max(validated, default=None),
        "epsilon_spent": last.get("epsilon_max", 0.0),
        "epsilon_spent_mean": last.get("epsilon_mean", 0.0),
        "epsilon_target": eps_target,
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        "noise_multiplier": sigma,
        "clipping": cfg.privacy.clipping if cfg.privacy.enabled else None,
        "rounds_completed": sum(1 for r in rows if r["round"] >= 1),  # round 0: prototypes
        "num_rounds": cfg.num_rounds,
        "num_clients": cfg.federation.num_clients,
        "clients_rejected_total": _total(rows, "clients_rejected"),
        "clients_sat_out_total": _total(rows, "clients_sat_out"),
        "clients_failed_total": _total(rows, "clients_failed"),
        "bytes_up_total": _total(rows, "bytes_up"),
        "bytes_up_per_client_round": _mean(rows, "bytes_up_per_client"),
        "bytes_down_total": _total(rows, "bytes_down"),
        "wall_time_s": sum(r["wall_time_s"] for r in rows),
    }


def out_of_budget(
    sat_out: dict[int, tuple[str, float]], ledger: Any, cfg: RunConfig
) -> dict[str, dict[str, Any]]:
    """Who sat out because a budget was spent, with the figures the user needs to act."""
    found: dict[str, dict[str, Any]] = {}
    for pid, (reason, spent) in sorted(sat_out.items()):
        who = client_id(pid)
        entry: dict[str, Any] = {"reason": reason, "epsilon_spent": spent}
        if reason == keys.OVER_BUDGET and cfg.privacy.enabled:
            try:
                entry["epsilon_budget"], entry["delta"] = ledger.budget(who)
                entry["epsilon_spent"] = ledger.spent(who)
            except Exception as err:  # noqa: BLE001 (a report line must not fail the run)
                log(WARNING, "privfed: could not read %s's budget: %s", who, err)
        found[who] = entry
    return found


def say_out_of_budget(found: dict[str, dict[str, Any]] | None) -> None:
    """The run's last words when clients sat out for budget reasons: a federation that trained
    nobody must not look like one that trained."""
    if not found:  # none, or withheld (user-level DP)
        return
    for who, e in found.items():
        if e["reason"] == keys.OVER_BUDGET and "epsilon_budget" in e:
            why = (
                f"the accountant refused: epsilon spent {e['epsilon_spent']:.3f} of its "
                f"lifetime budget {e['epsilon_budget']:g} (delta={e['delta']:g})"
            )
        elif e["reason"] == keys.OVER_BUDGET:
            why = f"the accountant refused: epsilon spent {e['epsilon_spent']:.3f}"
        else:
            why = (
                f"its device refused: epsilon spent {e['epsilon_spent']:.3f} of the device's "
                "own budget (PRIVFED_DEVICE_EPSILON, set on the device)"
            )
        log(WARNING, "privfed: %s sat out, budget spent: %s", who, why)
    log(
        WARNING,
        "privfed: %d client(s) sat out because their budget is spent. The ledger keeps lifetime "
        "budgets across runs: to train them again, start from a new ledger (docker compose: "
        "`docker compose down -v` drops it with the other volumes) or give them a new budget "
        "(privacy.epsilon=<larger>; a device's own with PRIVFED_DEVICE_EPSILON).",
        len(found),
    )


def plot_title(cfg: RunConfig, summary: dict) -> str:
    """The run in one line: what, at which privacy, and how well."""
    accuracy = summary["final_accuracy"]
    val = summary.get("final_val_accuracy")
    if accuracy is not None:
        acc = f"final accuracy {accuracy:.3f}"
    elif val is not None:
        acc = f"final validation accuracy {val:.3f} (no test evaluation)"
    else:
        acc = "no rounds"
    if summary["epsilon_target"] is None:
        privacy = "non-private"
    else:
        sigma = summary["noise_multiplier"]
        sigma_txt = f", sigma = {sigma:.3f}" if sigma is not None else ""
        target, delta = summary["epsilon_target"], summary["delta"]
        privacy = f"target epsilon = {target:g}, delta = {delta:g}{sigma_txt}"
    return f"{cfg.strategy.name} on {cfg.data.name}: {privacy}; {acc}"
