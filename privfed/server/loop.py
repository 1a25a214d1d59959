"""The server's round loop: broadcast, aggregate, evaluate, account, record, checkpoint.

It drives a strategy through the Message API (``configure_round`` -> ``grid.send_and_receive``
-> ``aggregate_round``, which return the round's outcome; Flower's ``configure_train`` and
``aggregate_train`` wrap the same two) rather than ``Strategy.start`` because a run must resume
from its last finished round with the same ledger, and every round writes a metrics line and a
checkpoint.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from privfed import array_codec, keys
from privfed.audit.user_canaries import UserCanaries
from privfed.config import RunConfig
from privfed.keys import client_id
from privfed.models.backbone import adapter_names
from privfed.models.head import head_names, prototype_head
from privfed.privacy import user_level
from privfed.privacy.backends import server_accountant
from privfed.privacy.calibration import client_plans, run_epsilon, user_sampling_rate
from privfed.privacy.invariants import required
from privfed.server import secure_round
from privfed.server.evaluate import evaluate
from privfed.server.prepared import PreparedRun, prepare_run
from privfed.server.progress import Progress, send_and_receive, stored_replies
from privfed.server.report import (
    out_of_budget,
    plot_title,
    round_row,
    run_summary,
    say_out_of_budget,
    withhold_counts,
)
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.replies import RoundOutcome, in_partition_order
from privfed.telemetry.plots import plot_run
from privfed.telemetry.prometheus import ServerMetrics
from privfed.telemetry.run_dir import RunDirectory


def _exchange(
    grid: Grid, phase: str, state: dict, expected: dict, base_config: dict, cfg: RunConfig
) -> list[tuple[dict, int]]:
    """A one-off exchange before round 1: ``state`` to every node, and (payload, num-examples)
    of each reply whose tensors are the ``expected`` ones (names; shapes where given) and
    finite."""
    config = ConfigRecord({**base_config, keys.SERVER_ROUND: 0, keys.PHASE: phase})
    messages = [
        Message(
            RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config}),
            message_type=MessageType.TRAIN,
            dst_node_id=node,
        )
        for node in sorted(grid.get_node_ids())
    ]
    out: list[tuple[dict, int]] = []
    replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout_s)
    for reply in in_partition_order(replies):
        if reply.has_error() or keys.ARRAYS not in reply.content.array_records:
            continue  # a client that failed or sat out contributes nothing
        payload = array_codec.to_state(reply.content.array_records[keys.ARRAYS])
        n = reply.content.metric_records[keys.METRICS].get(keys.NUM_EXAMPLES, 0)
        shapes_ok = all(
            expected[k].dim() == 0 or payload[k].shape == expected[k].shape for k in expected
        )
        finite = all(torch.isfinite(t).all() for t in payload.values())
        if set(payload) != set(expected) or not shapes_ok or not finite:
            log(WARNING, "%s: rejected a reply (wrong tensors or non-finite values)", phase)
            continue
        if isinstance(n, int) and n > 0:
            out.append((payload, n))
    return out


def _init_exchange(
    grid: Grid, strategy: AdapterStrategy, state: dict, base_config: dict, cfg: RunConfig
) -> dict:
    """A strategy's one-off initialisation exchange before round 1 (Fed-SB's svd init): every
    node releases what ``init_gradient_names`` names; the strategy builds the initial state."""
    expected = {n: torch.zeros(()) for n in strategy.init_gradient_names(state)}
    got = _exchange(grid, keys.PHASE_INIT, state, expected, base_config, cfg)
    if not got:
        raise RuntimeError(f"{strategy.name}: no client answered the initialisation exchange")
    log(INFO, "privfed: %s initialised from %d clients", strategy.name, len(got))
    return strategy.aggregate_init(state, [p for p, _ in got], [n for _, n in got])


def _prototype_exchange(
    grid: Grid, state: dict, base_config: dict, cfg: RunConfig, num_classes: int
) -> tuple[dict, RoundOutcome]:
    """The head recipe's prototypes (client/prototype_release.py): every node releases its
    (noised) per-class feature sums once; their sum's directions are the head's start."""
    weight_name, bias_name = head_names(state)
    expected = {keys.PROTOTYPES: torch.zeros(num_classes, state[weight_name].shape[1])}
    got = _exchange(grid, keys.PHASE_PROTOTYPES, {}, expected, base_config, cfg)
    if not got:
        raise RuntimeError("recipe.prototypes: no client answered the prototype exchange")
    total = torch.stack([p[keys.PROTOTYPES].to(torch.float64) for p, _ in got]).sum(0)
    log(INFO, "privfed: the head starts from the prototypes of %d clients", len(got))
    outcome = RoundOutcome(sampled=len(list(grid.get_node_ids())), trained=len(got))
    outcome.failed = outcome.sampled - outcome.trained
    head = prototype_head(total, cfg.recipe.prototype_scale)
    start = {weight_name: head["classifier.weight"], bias_name: head["classifier.bias"]}
    return {**state, **start}, outcome


def _wait_for_nodes(grid: Grid, wanted: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {wanted} nodes joined")
        time.sleep(0.5)


def _resume(
    checkpoint: dict[str, Any], strategy: AdapterStrategy, run_dir: RunDirectory
) -> tuple[int, dict, str]:
    """(first round to run, global state, run id) from the last checkpoint, with the strategy's
    state and the server's RNGs restored and the metrics lines after it dropped."""
    strategy.load_state_dict(checkpoint["strategy_state"])
    if strategy.user_dp is not None:
        strategy.user_dp.load_state_dict(checkpoint)
    if "rng" in checkpoint:  # not kept under user-level DP (save_checkpoint)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        random.setstate(checkpoint["rng"]["python"])
    run_dir.truncate_metrics(checkpoint["round"])
    log(INFO, "privfed: resuming %s after round %d", run_dir.path, checkpoint["round"])
    return checkpoint["round"] + 1, checkpoint["global_state"], checkpoint["run_id"]


def _base_config(
    cfg: RunConfig, run_dir: RunDirectory, run_id: str, sigma: float | None
) -> dict[str, Any]:
    """What every round's message config carries (the strategy adds its own keys)."""
    base: dict[str, Any] = {
        keys.RUN_ID: run_id,
        keys.LEDGER_PATH: str(run_dir.ledger_file.resolve()),
        keys.DEVICES_DIR: str(run_dir.devices_path.resolve()),
    }
    if cfg.audit.enabled:
        base[keys.AUDIT_DIR] = str((run_dir.path / "audit").resolve())
    if sigma is not None:
        base[keys.NOISE_MULTIPLIER] = float(sigma)
    return base


def _label_evaluator(
    cfg: RunConfig, model: torch.nn.Module, data: Any, state: dict, accuracy: float
) -> Callable[[list[str] | None], float]:
    """Accuracy of ``state`` on the *validation* examples of some labels (FedMentor's domain
    utility, a selection: never the test split); no labels: the whole validation split's,
    already measured."""

    def evaluate_labels(labels: list[str] | None) -> float:
        if not labels:
            return accuracy
        wanted = [data.label_names.index(x) for x in labels]
        rows = np.flatnonzero(np.isin(data.validation.labels.numpy(), wanted))
        subset = data.validation.subset(rows)
        return evaluate(model, state, subset, cfg.eval.batch_size, cfg.model.device)[0]

    return evaluate_labels


class Federation:
    """One run on the server: prepared once, then played round by round, then reported."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        run_dir: RunDirectory,
        prepared: PreparedRun | None = None,
    ) -> None:
        # A simulation plays the run the CLI prepared; a deployed ServerApp prepares it from the
        # config that travelled (its noise multipliers checked, not searched again).
        prepared = prepared if prepared is not None else prepare_run(cfg)
        cfg = prepared.cfg
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        self.data, self.strategy, self.model = prepared.data, prepared.strategy, prepared.model
        self.sigma = prepared.sigma
        self.ledger = server_accountant(cfg.privacy, run_dir.ledger_file)
        self.clients = [client_id(i) for i in range(cfg.federation.num_clients)]
        budgets = [self.strategy.client_budget(i) for i in range(len(self.clients))]
        # Under user-level DP each device accounts its record level itself (a report here would
        # say which devices were sampled): the run's ledger holds no device.
        if cfg.privacy.enabled and not cfg.privacy.user_level:
            for c, budget in zip(self.clients, budgets, strict=True):
                self.ledger.set_budget(
                    c,
                    budget,  # type: ignore[arg-type]
                    cfg.privacy.delta,  # type: ignore[arg-type]
                    cfg.privacy.accountant.method,
                )
        # The largest client budget (FedMentor's domains may set their own, above privacy.epsilon)
        self.eps_target = max(b for b in budgets if b is not None) if cfg.privacy.enabled else None
        self.user_dp = self.strategy.user_dp  # privacy.unit=user: DP-FedAvg, and its ledger
        if self.user_dp is not None:  # the population's, in the run directory
            self.user_dp.open_ledger(run_dir.user_ledger_file)
        self.process_id = uuid.uuid4().hex[:12]  # this server process (its releases' keys)
        self.checkpoint = run_dir.latest_checkpoint()
        if self.checkpoint is not None:
            self.start_round, self.state, self.run_id = _resume(
                self.checkpoint, self.strategy, run_dir
            )
        else:
            self.start_round, self.run_id = 1, uuid.uuid4().hex
            self.state = self.strategy.init_state(self.model, adapter_names(self.model))
            run_dir.run_id_file.write_text(self.run_id)
        user_dp = self.user_dp
        if cfg.audit.enabled and user_dp is not None:  # canary devices in DP-FedAvg's release
            reference = self.strategy.client_payload(self.state, self.state)
            user_dp.audit = UserCanaries(cfg, reference, user_dp.rate, run_dir.path / "audit")
        self.base_config = _base_config(cfg, run_dir, self.run_id, self.sigma)
        if user_dp is not None and user_dp.secure:  # what each device needs to make its share
            self.base_config.update(user_dp.secure_plan.entries())
        self.progress = Progress(
            cfg.num_rounds,
            self.start_round,
            enabled=cfg.telemetry.progress,
            count_clients=not cfg.privacy.user_level,
        )
        self.sat_out_on_budget: dict[int, tuple[str, float]] = {}  # partition -> (why, spent)
        self.last_spent: dict[str, float] = {}  # epsilon per client after the last round
        self.epsilon_by: str | None = None  # the bound that gave the largest of them

    def user_budget_allows(self, rnd: int) -> bool:
        """Before a user-level round: does its release fit the population's budget?"""
        return self.user_dp is None or self.user_dp.allows(rnd)

    def charge_user_round(self, rnd: int) -> float | None:
        """After the round's release, before anything of it is written (UserLevelDP.charge)."""
        user_dp = self.user_dp
        return None if user_dp is None else user_dp.charge(rnd, self.run_id, self.process_id)

    def save_checkpoint(self, rnd: int) -> None:
        blob = {
            "round": rnd,
            "run_id": self.run_id,
            "global_state": self.state,
            "strategy_state": self.strategy.state_dict(),
            "ledger": self.ledger.rows(),  # no device's rows under user-level DP
            "noise_multiplier": self.sigma,
            # user-level DP's state (adaptive clipping's C)
            **(self.user_dp.state_dict() if self.user_dp else {}),
        }
        if self.user_dp is None:
            # The process' generators, for a resume that repeats a privacy=none run exactly.
            # Not under user-level DP: how far they advanced could depend on how many devices
            # were sampled, and nothing of such a run repeats anyway (its draws are secret).
            blob["rng"] = {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            }
        self.run_dir.save_checkpoint(rnd, blob)

    def initialise(self) -> dict[str, Any] | None:
        """Wait for the clients; run the one-off exchanges on a fresh run (the head recipe's
        prototypes, the strategy's init). Returns round 0's metrics line after prototypes."""
        cfg = self.cfg
        _wait_for_nodes(self.grid, cfg.federation.num_clients, cfg.federation.round_timeout_s)
        if self.checkpoint is not None:
            return None
        row = None
        if cfg.recipe.prototypes:
            t0 = time.perf_counter()
            self.state, outcome = _prototype_exchange(
                self.grid, self.state, self.base_config, cfg, self.data.num_classes
            )
            row = self.evaluated_row(0, outcome, {}, (t0, time.perf_counter()))
        if self.strategy.has_init_round():
            self.state = _init_exchange(self.grid, self.strategy, self.state, self.base_config, cfg)
        if row is not None or self.strategy.has_init_round():
            self.save_checkpoint(0)  # a resume must not repeat the (charged) initialisation
        return row

    def validate(self) -> tuple[float, float]:
        """(accuracy, loss) of the current global state on the validation split."""
        cfg = self.cfg
        return evaluate(
            self.model, self.state, self.data.validation, cfg.eval.batch_size, cfg.model.device
        )

    def evaluated_row(
        self,
        rnd: int,
        out: RoundOutcome,
        strategy_metrics: dict[str, Any],
        times: tuple[float, float],
        val: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """The metrics line of the current state: validation always (``val``: already measured
        on this state), test where reported."""
        cfg = self.cfg
        if val is None:
            val = self.validate()
        test: tuple[float | None, float | None] = (None, None)
        if cfg.eval.test:  # a tuning run never computes it (eval.test=false)
            test = evaluate(
                self.model, self.state, self.data.test, cfg.eval.batch_size, cfg.model.device
            )
        self.last_spent = self.spent()
        row = round_row(
            rnd,
            out,
            test,
            self.last_spent,
            self.eps_target,
            self.sigma,
            (times[1] - times[0], time.perf_counter() - times[0]),
            strategy_metrics,
        )
        row["val_accuracy"], row["val_loss"] = val
        if self.epsilon_by is not None:
            row["epsilon_by"] = self.epsilon_by
        return row

    def play_round(self, rnd: int) -> dict[str, Any]:
        """Broadcast, collect, aggregate, evaluate; the round's metrics line."""
        cfg, strategy, t0 = self.cfg, self.strategy, time.perf_counter()
        messages, sent = strategy.configure_round(
            rnd, ArrayRecord(self.state), ConfigRecord(self.base_config), self.grid
        )
        user_dp = strategy.user_dp
        secure = user_dp is not None and user_dp.secure
        intake = None if secure else strategy.intake()  # SecAgg: the masked replies are read there
        replies = send_and_receive(
            self.grid,
            list(messages),
            cfg.federation.round_timeout_s,
            lambda done, of: self.progress.clients_done(rnd, done, of),
            intake.read if intake is not None else None,
            stored_replies(),  # None outside a simulation
        )
        clip_used = user_dp.clip_norm if user_dp else None  # user-level DP: this round's C
        if secure:  # the server learns only the noised sum
            new_state, out = secure_round.aggregate(
                self.grid,
                strategy,
                rnd,
                replies,
                sent,
                self.base_config,
                cfg.federation.round_timeout_s,
            )
        else:
            new_state, out = strategy.aggregate_round(rnd, replies, sent, intake)
        epsilon_user = self.charge_user_round(rnd)
        self.sat_out_on_budget.update(out.budget_sat_out)
        if new_state is not None:
            self.state = new_state
        t_trained = time.perf_counter()
        # Once per round: FedMentor's utility signal and the metrics line read the same state
        # (on MiniLM a pass over the validation split costs seconds on this machine's CPUs).
        val = self.validate()
        strategy_metrics = strategy.end_round(
            rnd,
            _label_evaluator(cfg, self.model, self.data, self.state, val[0]),
            lambda i: self.ledger.events(client_id(i)),
        )
        row = self.evaluated_row(rnd, out, strategy_metrics, (t0, t_trained), val)
        if user_dp is not None:
            row = withhold_counts(row)
            row["epsilon_user"] = epsilon_user
            row["epsilon_user_target"] = cfg.privacy.user.epsilon
            row["user_noise_multiplier"] = user_dp.sigma if user_dp else None
            row["user_clip_norm"] = clip_used
        return row

    def spent(self) -> dict[str, float]:
        """Epsilon per client; and ``epsilon_by``: the bound ("pld"/"rdp") of the largest.
        None under user-level DP (each device keeps its own: report.WITHHELD_UNDER_USER_DP)."""
        if not self.cfg.privacy.enabled or self.cfg.privacy.user_level:
            return {}
        by = {c: self.ledger.spent_by(c) for c in self.clients}
        self.epsilon_by = max(by.values(), key=lambda s: s.epsilon).method if by else None
        return {c: s.epsilon for c, s in by.items()}

    def record_level_bound(self) -> float | None:
        """The record-level epsilon of a device that trains in every round (None without
        record-level DP): the bound the run's sigma was calibrated to meet."""
        p = self.cfg.privacy
        if not p.enabled or self.sigma is None:
            return None
        return run_epsilon(
            client_plans(self.data.sizes(), self.cfg.train),
            self.sigma,
            self.cfg.num_rounds,
            required(p.delta, "privacy.delta"),
            self.strategy.fixed_events(),
            p.accountant.method,
        )

    def report(self) -> dict[str, Any]:
        """summary.json, the plot, the final table and, if any, who sat out on a spent budget."""
        cfg, run_dir = self.cfg, self.run_dir
        rows = run_dir.read_metrics()
        summary = run_summary(cfg, self.run_id, rows, self.eps_target, self.sigma)
        if cfg.privacy.enabled:  # which accountant measured epsilon_spent, and which bound won
            summary["accountant"] = cfg.privacy.accountant.method
            summary["epsilon_spent_by"] = self.epsilon_by
        user_dp = self.user_dp
        if user_dp is not None:
            user = cfg.privacy.user
            spent = required(user_dp.ledger, "the population's ledger").spent_by(
                user_level.POPULATION
            )
            summary.update(
                {
                    # a device's record-level epsilon if sampled in every round: public, where
                    # what each device spent is its own (it depends on when it was sampled)
                    "epsilon_record_bound": self.record_level_bound(),
                    "epsilon_spent_by": None,
                    "privacy_unit": "user",
                    # a clip-only control has no user-level guarantee (its epsilon is infinite)
                    "user_guarantee": "none (clip-only control)" if user.clip_only else "dp",
                    "epsilon_user": None if user.clip_only else spent.epsilon,
                    "epsilon_user_by": spent.method,
                    "epsilon_user_target": user.epsilon,
                    "user_delta": user.delta,
                    "user_noise_multiplier": user_dp.sigma,
                    "user_sampling_rate": user_sampling_rate(cfg),
                    "user_clip_norm": user.clip_norm,
                    "user_clipping": user.clipping,
                    "user_server_learning_rate": user.server_learning_rate,
                }
            )
        summary.update(self.strategy.summary_metrics())
        summary["clients_out_of_budget"] = (
            None  # withheld under user-level DP: who sat out says who was sampled
            if user_dp is not None
            else out_of_budget(self.sat_out_on_budget, self.ledger, cfg)
        )
        run_dir.write_json(run_dir.summary_file, summary)
        if cfg.telemetry.plot and rows:
            plot_run(rows, run_dir.plot_file, plot_title(cfg, summary), self.eps_target)
        self.progress.final_table(summary)
        say_out_of_budget(summary["clients_out_of_budget"])
        return summary


def run_federation(
    grid: Grid, cfg: RunConfig, run_dir: RunDirectory, prepared: PreparedRun | None = None
) -> dict[str, Any]:
    run = Federation(grid, cfg, run_dir, prepared)
    metrics = ServerMetrics(cfg.telemetry.prometheus_port, cfg.telemetry.prometheus_host)
    try:
        initial = run.initialise()
        if initial is not None:  # round 0: the head's prototypes
            run_dir.append_metrics(initial)
            metrics.observe_round(initial, run.last_spent)
            run.progress.round_done(initial)
        for rnd in range(run.start_round, cfg.num_rounds + 1):
            if not run.user_budget_allows(rnd):
                break
            row = run.play_round(rnd)
            run_dir.append_metrics(row)
            run.save_checkpoint(rnd)
            metrics.observe_round(row, run.last_spent)
            run.progress.round_done(row)
    finally:
        metrics.close()
    return run.report()
