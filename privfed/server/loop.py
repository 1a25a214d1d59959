"""The server's round loop: broadcast, aggregate, evaluate, account, record, checkpoint.

It drives a Flower strategy through the Message API (``configure_train`` ->
``grid.send_and_receive`` -> ``aggregate_train``) rather than ``Strategy.start`` because a run
must resume from its last finished round with the same ledger, and every round writes a metrics
line and a checkpoint.
"""

from __future__ import annotations

import random
import time
import uuid
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from privfed import keys
from privfed.config import RunConfig
from privfed.data.federated import federated_data
from privfed.keys import client_id
from privfed.models.backbone import adapter_names, fresh_model
from privfed.privacy.backends import server_accountant
from privfed.server.evaluate import evaluate
from privfed.server.progress import Progress, send_and_receive
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.registry import build_strategy
from privfed.telemetry.memory import process_tree_rss_mb
from privfed.telemetry.plots import plot_run
from privfed.telemetry.prometheus import ServerMetrics
from privfed.telemetry.run_dir import RunDirectory


def _init_exchange(
    grid: Grid, strategy: AdapterStrategy, state: dict, base_config: dict, cfg: RunConfig
) -> dict:
    """A strategy's one-off initialisation exchange before round 1 (Fed-SB's svd init): every
    node releases what ``init_gradient_names`` names; the strategy builds the initial state."""
    expected = {n: torch.zeros(()) for n in strategy.init_gradient_names(state)}
    config = ConfigRecord({**base_config, keys.SERVER_ROUND: 0, keys.PHASE: keys.PHASE_INIT})
    messages = [
        Message(
            RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config}),
            message_type=MessageType.TRAIN,
            dst_node_id=node,
        )
        for node in sorted(grid.get_node_ids())
    ]
    payloads, counts = [], []
    for reply in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s):
        if reply.has_error() or keys.ARRAYS not in reply.content.array_records:
            continue  # a client that failed or sat out contributes nothing
        payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
        n = reply.content.metric_records[keys.METRICS].get(keys.NUM_EXAMPLES, 0)
        finite = all(torch.isfinite(t).all() for t in payload.values())
        if set(payload) != set(expected) or not finite:
            log(WARNING, "init: rejected a reply (wrong tensors or non-finite values)")
            continue
        if isinstance(n, int) and n > 0:
            payloads.append(payload)
            counts.append(n)
    if not payloads:
        raise RuntimeError(f"{strategy.name}: no client answered the initialisation exchange")
    log(INFO, "privfed: %s initialised from %d clients", strategy.name, len(payloads))
    return strategy.aggregate_init(state, payloads, counts)


def _wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {wanted} nodes joined")
        time.sleep(0.5)


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDirectory) -> dict[str, Any]:
    data = federated_data(cfg)
    strategy = build_strategy(cfg)
    model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size, strategy.adapter)
    names = adapter_names(model)
    sigma = strategy.calibrate_noise(data.sizes())
    ledger = server_accountant(cfg.privacy, run_dir.ledger_file)
    clients = [client_id(i) for i in range(cfg.federation.num_clients)]
    if cfg.privacy.enabled:
        for i, c in enumerate(clients):
            ledger.set_budget(c, strategy.client_budget(i), cfg.privacy.delta)  # type: ignore[arg-type]

    checkpoint = run_dir.latest_checkpoint()
    if checkpoint is not None:
        start_round = checkpoint["round"] + 1
        state = checkpoint["global_state"]
        run_id = checkpoint["run_id"]
        strategy.load_state_dict(checkpoint["strategy_state"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
        run_dir.truncate_metrics(checkpoint["round"])
        log(INFO, "privfed: resuming %s after round %d", run_dir.path, checkpoint["round"])
    else:
        start_round = 1
        state = strategy.init_state(model, names)
        run_id = uuid.uuid4().hex
        run_dir.run_id_file.write_text(run_id)
    # The largest client budget (FedMentor's domains may set their own, above privacy.epsilon)
    budgets = [strategy.client_budget(i) for i in range(cfg.federation.num_clients)]
    eps_target = max(b for b in budgets if b is not None) if cfg.privacy.enabled else None
    base_config = {
        keys.RUN_ID: run_id,
        keys.LEDGER_PATH: str(run_dir.ledger_file.resolve()),
        keys.RELEASES_DIR: str((run_dir.path / "releases").resolve()),
    }
    if cfg.audit.enabled:
        base_config[keys.AUDIT_DIR] = str((run_dir.path / "audit").resolve())
    if sigma is not None:
        base_config[keys.NOISE_MULTIPLIER] = float(sigma)

    def save_checkpoint(rnd: int) -> None:
        run_dir.save_checkpoint(
            rnd,
            {
                "round": rnd,
                "run_id": run_id,
                "global_state": state,
                "strategy_state": strategy.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
                "ledger": ledger.rows(),
                "noise_multiplier": sigma,
            },
        )

    metrics = ServerMetrics(cfg.telemetry.prometheus_port, cfg.telemetry.prometheus_host)
    progress = Progress(cfg.num_rounds, start_round, enabled=cfg.telemetry.progress)
    _wait_for_nodes(grid, cfg.federation.num_clients, cfg.federation.round_timeout_s)
    if checkpoint is None and strategy.has_init_round():
        state = _init_exchange(grid, strategy, state, base_config, cfg)
        save_checkpoint(0)  # a resume must not repeat the (charged) initialisation
    out_of_budget: dict[int, tuple[str, float]] = {}  # partition -> (reason, epsilon spent)
    try:
        for rnd in range(start_round, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            messages = strategy.configure_train(
                rnd, ArrayRecord(state), ConfigRecord(base_config), grid
            )
            replies = send_and_receive(
                grid,
                list(messages),
                cfg.federation.round_timeout_s,
                lambda done, sent, rnd=rnd: progress.clients_done(rnd, done, sent),
            )
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            out = strategy.outcome
            out_of_budget.update(out.budget_sat_out)
            if new_arrays is not None:
                state = new_arrays.to_torch_state_dict()
            t_train = time.perf_counter() - t0
            accuracy, loss = evaluate(
                model, state, data.test, cfg.eval.batch_size, cfg.model.device
            )

            def evaluate_labels(
                labels: list[str] | None, accuracy: float = accuracy, state: dict = state
            ) -> float:
                if not labels:
                    return accuracy
                wanted = [data.label_names.index(x) for x in labels]
                rows = np.flatnonzero(np.isin(data.test.labels.numpy(), wanted))
                return evaluate(
                    model, state, data.test.subset(rows), cfg.eval.batch_size, cfg.model.device
                )[0]

            strategy_metrics = strategy.end_round(
                rnd, evaluate_labels, lambda i: ledger.events(client_id(i))
            )
            spent = {c: ledger.spent(c) for c in clients} if cfg.privacy.enabled else {}
            row = {
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
                # why, where a client said: its device refused, the round was in progress
                # elsewhere, or the accountant did not answer
                **{
                    f"clients_{reason.replace('-', '_')}": n
                    for reason, n in out.sat_out_reasons.items()
                },
                "clients_rejected": out.rejected,
                "clients_failed": out.failed,
                "bytes_down": out.bytes_down,
                "bytes_up": out.bytes_up,
                # per client that was sent a message / that replied (the sizes differ by strategy)
                "bytes_down_per_client": out.bytes_down / max(1, out.sampled),
                "bytes_up_per_client": out.bytes_up / max(1, out.sampled - out.failed),
                "train_time_s": t_train,
                "client_train_time_s": sum(out.client_train_time_s),
                "wall_time_s": time.perf_counter() - t0,
                "memory_rss_mb": process_tree_rss_mb(),
                **out.extra,
                **strategy_metrics,
            }
            run_dir.append_metrics(row)
            save_checkpoint(rnd)
            metrics.observe_round(row, spent)
            progress.round_done(row)
    finally:
        metrics.close()

    rows = run_dir.read_metrics()
    last = rows[-1] if rows else {}
    summary = {
        "run_id": run_id,
        "strategy": cfg.strategy.name,
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "best_accuracy": max((r["accuracy"] for r in rows), default=None),
        "epsilon_spent": last.get("epsilon_max", 0.0),
        "epsilon_spent_mean": last.get("epsilon_mean", 0.0),
        "epsilon_target": eps_target,
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        "noise_multiplier": sigma,
        "clipping": cfg.privacy.clipping if cfg.privacy.enabled else None,
        "rounds_completed": len(rows),
        "num_rounds": cfg.num_rounds,
        "num_clients": cfg.federation.num_clients,
        "clients_rejected_total": sum(r["clients_rejected"] for r in rows),
        "clients_sat_out_total": sum(r["clients_sat_out"] for r in rows),
        "clients_failed_total": sum(r["clients_failed"] for r in rows),
        "bytes_up_total": sum(r["bytes_up"] for r in rows),
        "bytes_up_per_client_round": float(np.mean([r["bytes_up_per_client"] for r in rows]))
        if rows
        else 0.0,
        "bytes_down_total": sum(r["bytes_down"] for r in rows),
        "wall_time_s": sum(r["wall_time_s"] for r in rows),
        "clients_out_of_budget": _out_of_budget(out_of_budget, ledger, cfg),
    }
    run_dir.write_json(run_dir.summary_file, summary)
    if cfg.telemetry.plot and rows:
        plot_run(rows, run_dir.plot_file, _plot_title(cfg, summary), eps_target)
    progress.final_table(summary)
    _say_out_of_budget(summary["clients_out_of_budget"])
    return summary


def _out_of_budget(
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


def _say_out_of_budget(found: dict[str, dict[str, Any]]) -> None:
    """The run's last words when clients sat out for budget reasons: a federation that trained
    nobody must not look like one that trained."""
    if not found:
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


def _plot_title(cfg: RunConfig, summary: dict) -> str:
    """The run in one line: what, at which privacy, and how well."""
    accuracy = summary["final_accuracy"]
    acc = f"final accuracy {accuracy:.3f}" if accuracy is not None else "no rounds"
    if summary["epsilon_target"] is None:
        privacy = "non-private"
    else:
        sigma = summary["noise_multiplier"]
        sigma_txt = f", sigma = {sigma:.3f}" if sigma is not None else ""
        target, delta = summary["epsilon_target"], summary["delta"]
        privacy = f"target epsilon = {target:g}, delta = {delta:g}{sigma_txt}"
    return f"{cfg.strategy.name} on {cfg.data.name}: {privacy}; {acc}"
