"""The strategy protocol: pure tensor-level methods plus a thin Flower Message-API adapter.

A strategy subclasses :class:`AdapterStrategy` and overrides the pure methods
(``init_state``, ``trainable``, ``client_payload``, ``aggregate``, ``round_config``); the round
is shared (``configure_round`` / ``aggregate_round``, and Flower's ``configure_train`` /
``aggregate_train`` over them): it samples nodes, broadcasts the global adapter state with each
client's config, validates every reply (names, shapes, dtype, finite values) and drops and
counts bad ones, so one bad client never crashes a round. The round's outcome is returned.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privfed import array_codec, keys
from privfed.config import ModelConfig, RunConfig
from privfed.fixed_broadcast import FixedBroadcast
from privfed.models.backbone import fresh_model
from privfed.models.head import set_centre
from privfed.privacy.calibration import (
    noise_multiplier_for,
    recipe_events,
)
from privfed.privacy.events import PrivacyEvent
from privfed.randomness import public_seed
from privfed.strategies.replies import (
    InvalidReply,
    ReplyIntake,
    RoundOutcome,
    in_partition_order,
    informational,
    validate_payload,
)
from privfed.strategies.settings import StrategySettings, read_settings
from privfed.strategies.user_level_dp import UserLevelDP
from privfed.telemetry.bytes import serialized_size
from privfed.tensors import State


@dataclass(frozen=True)
class Supports:
    """What a strategy can run with. The run's checks (strategies/registry.py) and the benches
    read it from the class, so a strategy states it in its own module and nowhere else."""

    # privacy.unit=user: its payload is a plain tensor set that DP-FedAvg can clip and noise
    user_level: bool = True
    why_not_user_level: str = "not a plain tensor payload"
    # recipe.trains=head: it aggregates a head alone (the others change how LoRA factors do)
    head_alone: bool = False
    # recipe.prototypes: its head is FedAvg'd, so DP class prototypes can start it
    prototype_head: bool = False
    # a noise policy's base (FedMentor's domain-aware noise): its round is plain DP-SGD at one
    # calibrated sigma, with no release of its own besides, so a policy may set sigma per client
    noise_policy_base: bool = False


class AdapterStrategy(Strategy):
    """Base class of privfed strategies (a Flower ``Strategy``)."""

    name = "base"
    adapter: ClassVar[str] = "lora"  # the model's adapter parameterisation (models/backbone.py)
    supports: ClassVar[Supports] = Supports()
    # The strategy's own keys (strategy.*), validated; defaults only in conf/strategy/<name>.yaml
    Settings: ClassVar[type[StrategySettings]] = StrategySettings

    def __init__(self, cfg: RunConfig, settings: StrategySettings | None = None) -> None:
        self.cfg = cfg
        self.settings = settings if settings is not None else read_settings(self.Settings, cfg)
        self.global_state: State = {}
        # Flower's Strategy API splits a round over two calls; what the first sent, for the
        # second (configure_train -> aggregate_train). privfed's loop passes it instead.
        self._sent = RoundOutcome()
        self.client: int | None = None  # set on a client: its partition id
        # privacy.unit=user: DP-FedAvg releases what this strategy then aggregates
        self.user_dp = UserLevelDP(cfg) if cfg.privacy.user_level else None
        self.server_round = 0
        self.fixed_broadcast = FixedBroadcast()  # which nodes hold the fixed tensors

    @property
    def model_config(self) -> ModelConfig:
        """The model this strategy trains: ``model.*`` unless the strategy sets its adapter's
        shape itself (Fed-SB's rank)."""
        return self.cfg.model

    @property
    def parameterisation(self) -> str:
        """The model's trainable part: the strategy's adapter, or the head alone
        (``recipe.trains=head``)."""
        return "head" if self.cfg.recipe.trains == "head" else self.adapter

    def new_model(self, data: Any) -> torch.nn.Module:
        """A fresh model of this run for ``data`` (its FederatedData): the adapter state at its
        initial values, a mean-pooling head given the data's public centre."""
        model = fresh_model(
            self.model_config,
            data.num_classes,
            self.cfg.seed,
            data.vocab_size,
            self.parameterisation,
        )
        if data.centre is not None:
            set_centre(model, data.centre)
        return model

    def on_client(self, partition_id: int, server_round: int = 0) -> AdapterStrategy:
        """Bind the strategy to the client (and round) it runs on (client-side methods may
        depend on them)."""
        self.client = partition_id
        self.server_round = server_round
        return self

    # -- validation of the strategy's own parameters (before anything starts) -----------------
    @classmethod
    def validate_params(cls, cfg: RunConfig) -> None:
        """Raise ``ValueError("strategy.<key>: ...")`` on bad strategy parameters."""
        cls.check_settings(read_settings(cls.Settings, cfg), cfg)

    @classmethod
    def check_settings(cls, settings: Any, cfg: RunConfig) -> None:
        """What the model alone cannot check: the settings against the rest of the run."""

    # -- pure, tensor-level protocol ------------------------------------------------------------
    def init_state(self, model: torch.nn.Module, names: list[str]) -> State:
        params = dict(model.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    def trainable(self, name: str) -> bool:
        return True

    def fixed(self, name: str) -> bool:
        """Whether the tensor never changes once training starts (Fed-SB's B and A): the server
        sends it to each node once (fixed_broadcast.py)."""
        return False

    def client_payload(self, global_state: State, local_state: State) -> State:
        return {n: t for n, t in local_state.items() if self.trainable(n)}

    def declared_payload(self, global_state: State) -> State:
        """What a reply carries: each tensor by name, shape and dtype (the values are not
        used). A client refuses to send anything else (client/release_protocol.py) and the
        server rejects anything else."""
        return self.client_payload(global_state, global_state)

    def check_payload(self, payload: State, global_state: State) -> None:
        """Strategy-specific checks of a reply whose names, shapes and dtypes are right; raise
        :class:`InvalidReply` to drop it (e.g. RQM level indices out of range)."""

    def aggregate(self, global_state: State, payloads: list[State], weights: list[float]) -> State:
        raise NotImplementedError

    def round_config(self, server_round: int, client: int) -> dict[str, Any]:
        return {}

    def round_metrics(
        self, global_state: State, payloads: list[State], weights: list[float]
    ) -> dict[str, float]:
        """Strategy-specific metrics of one aggregation (e.g. ``aggregation_error``)."""
        return {}

    # -- privacy plan (before round 1) -------------------------------------------------------
    def calibrate_noise(self, data: Any, model: torch.nn.Module) -> float | None:
        """The DP-SGD noise multiplier (None without DP) for the run's clients (``data``, its
        FederatedData) and ``model`` (as :meth:`new_model` built it): searched once before
        start, checked where the config carries it (planned_noise_multiplier). Raises
        BudgetUnreachableError. Strategies with per-client noise override it."""
        return noise_multiplier_for(self.cfg, data.sizes(), self.fixed_events())

    def client_budget(self, partition_id: int) -> float | None:
        """The epsilon budget of a client (None without DP)."""
        return self.cfg.privacy.epsilon if self.cfg.privacy.enabled else None

    def client_noise_multiplier(self, config: ConfigRecord) -> float:
        """On a client: the noise multiplier of this round, from the round's config."""
        return keys.number(config, keys.NOISE_MULTIPLIER)

    def uses_own_mechanism(self) -> bool:
        """True if clients release through :meth:`private_release` under
        :meth:`planned_event` instead of DP-SGD (RQM's privacy mode)."""
        return False

    def planned_event(self, num_examples: int, dims: int) -> PrivacyEvent:
        raise NotImplementedError

    def private_release(
        self, model: torch.nn.Module, local: Any, batch_size: int, device: str
    ) -> State:
        raise NotImplementedError

    # -- an optional data-dependent initialisation exchange before round 1 (Fed-SB's svd) -------
    def has_init_round(self) -> bool:
        return False

    def fixed_events(self) -> list[PrivacyEvent]:
        """Everything every client is charged once besides its rounds: the recipe's releases
        (the head's prototypes) and the strategy's own (:meth:`init_events`)."""
        return [*recipe_events(self.cfg), *self.init_events()]

    def init_events(self) -> list[PrivacyEvent]:
        """Privacy events every client is charged once, besides its DP-SGD rounds (the noise
        calibration composes them in)."""
        return []

    def init_gradient_names(self, global_state: State) -> list[str]:
        """The model parameters whose clipped (noised) gradient sums clients release at init."""
        return []

    def aggregate_init(
        self, global_state: State, payloads: Sequence[State], num_examples: list[int]
    ) -> State:
        raise NotImplementedError

    def end_round(
        self,
        server_round: int,
        evaluate_labels: Callable[[list[str] | None], float],
        events_of: Callable[[int], list[PrivacyEvent]],
    ) -> dict[str, Any]:
        """After the server's evaluation of a round: strategy metrics for the round's line and
        any decision for the next round (FedMentor's per-domain noise). ``evaluate_labels``
        gives the global model's accuracy on the validation examples of some labels (all for
        None); ``events_of(partition)`` a client's privacy events so far."""
        return {}

    def summary_metrics(self) -> dict[str, Any]:
        """What the strategy adds to summary.json (FedMentor: its per-domain targets and sigmas)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Strategy state beyond the global tensors, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- Flower Message-API adapter -------------------------------------------------------------
    def summary(self) -> None:
        log(
            INFO,
            "\t└──> privfed strategy %s (%d clients/round)",
            self.name,
            self.cfg.federation.clients_per_round,
        )

    def sample_nodes(self, server_round: int, node_ids: list[int]) -> list[int]:
        if self.user_dp is not None:
            return self.user_dp.sample(node_ids)
        # Public and reproducible across resumes (the clients' data is protected by their own
        # DP-SGD, not by who is sampled: record-level DP).
        rng = random.Random(public_seed(self.cfg.seed, "client_sampling", server_round))
        k = min(self.cfg.federation.clients_per_round, len(node_ids))
        return sorted(rng.sample(sorted(node_ids), k))

    # -- the round: what is sent, and what came back (returned, never left on the strategy) ---
    def configure_round(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[list[Message], RoundOutcome]:
        """The round's messages, and the outcome so far (how many sampled, bytes down)."""
        self.global_state = arrays.to_torch_state_dict()
        node_ids = self.sample_nodes(server_round, list(grid.get_node_ids()))
        broadcasts = self.fixed_broadcast.messages(arrays, self.global_state, self.fixed, node_ids)
        messages = []
        for node_id in node_ids:
            node_arrays, fixed_entries = broadcasts[node_id]
            cfg = ConfigRecord(
                {
                    **config,
                    keys.SERVER_ROUND: server_round,
                    **fixed_entries,
                    **self.round_config(server_round, node_id),
                }
            )
            content = RecordDict({keys.ARRAYS: node_arrays, keys.CONFIG: cfg})
            messages.append(
                Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id)
            )
        sent = RoundOutcome(
            sampled=len(messages), bytes_down=serialized_size(*(m.content for m in messages))
        )
        return messages, sent

    def intake(self) -> ReplyIntake:
        """Where this round's replies are read as they arrive (before :meth:`aggregate_round`,
        against the state the round broadcast)."""
        expected = self.declared_payload(self.global_state)
        return ReplyIntake(lambda msg: self._parse_reply(msg, expected))

    def aggregate_round(
        self,
        server_round: int,
        replies: Iterable[Message],
        sent: RoundOutcome,
        intake: ReplyIntake | None = None,
    ) -> tuple[State | None, RoundOutcome]:
        """The new global state (None: nothing to aggregate) and what happened to each reply:
        trained, sat out and why, rejected, failed, bytes up, the strategy's metrics.
        ``intake``: the round's, with what it read already (default: read here)."""
        out = RoundOutcome(sampled=sent.sampled, bytes_down=sent.bytes_down)
        intake = intake or self.intake()
        # Under user-level DP a line per failed or rejected device would say it was sampled.
        user_dp = self.user_dp
        quiet = user_dp is not None
        # what a device that changed nothing sends: user-level updates are measured from it
        reference = self.client_payload(self.global_state, self.global_state) if user_dp else {}
        payloads: list[State] = []
        weights: list[float] = []
        losses: list[tuple[float, float]] = []
        for msg in in_partition_order(replies):
            self.fixed_broadcast.replied(msg.metadata.src_node_id, ok=not msg.has_error())
            if msg.has_error():
                out.failed += 1
                if not quiet:
                    log(WARNING, "round %d: client failed: %s", server_round, msg.error.reason)
                continue
            out.bytes_up += intake.size(msg)
            metrics = msg.content.metric_records.get(keys.METRICS, MetricRecord())
            if metrics.get(keys.SAT_OUT, 0):
                out.sat_out += 1
                for reason in keys.SAT_OUT_REASONS:
                    out.sat_out_reasons[reason] += int(bool(metrics.get(reason, 0)))
                spent_on = next((r for r in keys.BUDGET_REASONS if metrics.get(r)), None)
                pid = metrics.get(keys.PARTITION_ID)
                if spent_on is not None and isinstance(pid, int):
                    spent = informational(metrics, keys.EPSILON_SPENT, math.nan)
                    out.budget_sat_out[pid] = (spent_on, spent)
                continue
            try:
                payload, n = intake.parsed(msg)
                if user_dp is not None:  # clipping=client: over C is rejected
                    user_dp.screen(payload, reference)
            except InvalidReply as err:
                out.rejected += 1
                out.rejections.append(str(err))
                if not quiet:
                    log(WARNING, "round %d: rejected a reply: %s", server_round, err)
                continue
            payloads.append(payload)
            weights.append(float(n) if self.cfg.train.weighting == "num_examples" else 1.0)
            losses.append((informational(metrics, keys.TRAIN_LOSS, math.nan), float(n)))
            out.client_train_time_s.append(informational(metrics, keys.TRAIN_TIME, 0.0))
        out.trained = len(payloads)
        if user_dp is not None:  # one release: the clipped updates' noised mean
            released = user_dp.release(server_round, reference, payloads, out)
            new_state = self.aggregate(self.global_state, [released], [1.0])  # post-processing
            self.global_state = new_state
            return new_state, out
        if not payloads:
            return None, out
        finite = [(loss, n) for loss, n in losses if np.isfinite(loss)]
        if finite:
            out.train_loss = sum(loss * n for loss, n in finite) / sum(n for _, n in finite)
        out.extra = self.round_metrics(self.global_state, payloads, weights)
        new_state = self.aggregate(self.global_state, payloads, weights)
        self.global_state = new_state
        return new_state, out

    # -- Flower's Strategy API over the two above ------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages, self._sent = self.configure_round(server_round, arrays, config, grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        new_state, out = self.aggregate_round(server_round, replies, self._sent)
        metrics = MetricRecord({"trained": out.trained, **out.extra})
        return (ArrayRecord(new_state) if new_state is not None else None), metrics

    def _parse_reply(self, msg: Message, expected: State) -> tuple[State, int]:
        records = msg.content.array_records
        if keys.ARRAYS not in records:
            raise InvalidReply("no payload")
        try:
            payload = array_codec.to_state(records[keys.ARRAYS])
        except Exception as err:  # undecodable arrays
            raise InvalidReply(f"undecodable payload: {err}") from None
        validate_payload(payload, expected)
        self.check_payload(payload, self.global_state)
        metrics = msg.content.metric_records.get(keys.METRICS, MetricRecord())
        n = metrics.get(keys.NUM_EXAMPLES, 0)
        if not isinstance(n, int) or n <= 0:
            raise InvalidReply(f"num-examples must be a positive integer, got {n!r}")
        return payload, n

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the server evaluates centrally on the held-out split

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None
