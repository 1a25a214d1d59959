"""The Flower ClientApp: DP-SGD local training of the adapter, accounted before it replies.

One round on a client (ARCHITECTURE.md "How one round flows"):
1. load the broadcast adapter state; only the tensors the strategy trains get gradients;
2. ask the accountant whether this round's event fits the client's budget; if not, sit out
   (reply ``sat-out``, no payload: nothing is trained, nothing is spent);
3. run DP-SGD (Opacus), store the release, record the event in the ledger (durable and
   idempotent) and only then
4. reply with exactly what the strategy says travels. A re-run of an already released round
   (after a resume) sends the stored release again (see privacy/releases.py).

The other release kinds sit beside it: a strategy's own mechanism (own_mechanism.py) and a
one-off initialisation release (init_release.py); all three go through the same protocol
(release_protocol.py: plan, release, store, record, reply).

In simulation the validated config is bound in by :func:`make_client_app`; a deployed
ClientApp (``app`` below, run by a SuperNode) reads it from ``context.run_config``.
"""

from __future__ import annotations

import time
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from privfed import array_codec, fixed_broadcast, keys
from privfed.audit.canaries import CanaryGradients, CanaryObservation, audited_data, canary_plan
from privfed.audit.faults import mechanism_fault, with_fault
from privfed.audit.report import write_observation
from privfed.client import secure_aggregation
from privfed.client.context import config_from_context
from privfed.client.device import DeviceBudget
from privfed.client.init_release import init_round
from privfed.client.local_model import local_model
from privfed.client.own_mechanism import own_mechanism_round
from privfed.client.prototype_release import prototype_round
from privfed.client.release_protocol import released_once, reply, sat_out
from privfed.config import RunConfig
from privfed.keys import client_id
from privfed.privacy.dp_sgd import (
    LocalResult,
    local_plan,
    round_learning_rate,
    round_randomness,
    train_local,
)
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.invariants import required
from privfed.privacy.ledger import EventKey
from privfed.strategies.registry import build_strategy
from privfed.telemetry.client_profile import CallProfile
from privfed.telemetry.console import quiet_actor_teardown


def train_round(cfg: RunConfig, msg: Message, context: Context) -> Message:
    profile = CallProfile(cfg.model.device)  # device-local timing, for benchmarks only
    try:
        return _train_round(cfg, msg, context, profile)
    finally:
        server_round = keys.integer(msg.content.config_records[keys.CONFIG], keys.SERVER_ROUND)
        profile.write(server_round)


def _train_round(cfg: RunConfig, msg: Message, context: Context, profile: CallProfile) -> Message:
    started = profile.started
    torch.set_num_threads(max(1, int(cfg.federation.client_resources.num_cpus)))
    partition_id = int(context.node_config[keys.NODE_PARTITION_ID])
    config = msg.content.config_records[keys.CONFIG]
    server_round = keys.integer(config, keys.SERVER_ROUND)
    strategy = build_strategy(cfg).on_client(partition_id, server_round)
    secure = strategy.user_dp is not None and strategy.user_dp.secure
    if secure and config.get(keys.PHASE) in keys.SECAGG_PHASES:  # after training: SecAgg+
        return secure_aggregation.stage(msg, context)
    # Before any reply: the server takes every reply but an error to mean "kept them".
    global_state = fixed_broadcast.complete(
        array_codec.to_state(msg.content.array_records[keys.ARRAYS]),
        config,
        context,
        strategy.fixed,
    )
    device = DeviceBudget.from_env()
    refusal = device.refusal(cfg) if device is not None else None
    if refusal is not None:
        log(WARNING, "%s: this device refuses the run: %s", client_id(partition_id), refusal)
        return sat_out(cfg, msg, partition_id, float("nan"), device_refused=1)
    if config.get(keys.PHASE) == keys.PHASE_PROTOTYPES:
        return prototype_round(cfg, msg, partition_id)
    local = audited_data(cfg).client(partition_id)  # an audit's canaries are records here
    if config.get(keys.PHASE) == keys.PHASE_INIT:
        return init_round(cfg, msg, strategy, global_state, partition_id, started)

    def train(sigma: float | None) -> tuple[dict, LocalResult]:
        with local_model(
            cfg, strategy, global_state, keep=cfg.federation.reuse_client_model
        ) as worker:
            canaries = _canaries(cfg, worker.model)
            observer = None
            if canaries is not None:  # an audit: the auditors see each step's release
                observer = CanaryObservation(canaries, canaries.plan.owned_by(partition_id))
            result = train_local(
                worker.model,
                local,
                cfg.train,
                cfg.privacy,
                sigma,
                with_fault(
                    round_randomness(cfg.privacy.enabled, cfg.seed, partition_id, server_round),
                    cfg.audit.break_mechanism,
                    cfg.seed,
                    partition_id,
                    server_round,
                ),
                device=cfg.model.device,
                learning_rate=round_learning_rate(cfg.train, server_round, cfg.num_rounds),
                supplied=canaries,
                on_release=observer,
                fault=mechanism_fault(cfg.audit.break_mechanism),
                per_sample=worker,
                clock=profile.clock,
            )
            trained = worker.adapter_state()
        if observer is not None:
            clip = required(cfg.privacy.max_grad_norm, "privacy.max_grad_norm")
            sigma = required(sigma, "the noise multiplier")
            write_observation(
                Path(str(config[keys.AUDIT_DIR])),
                server_round,
                partition_id,
                observer.ids,
                observer.released,
                noise_std=sigma * clip,
                steps=result.steps,
                numels=[p.numel() for p in observer.canaries.params],
            )
        payload = strategy.client_payload(global_state, trained)
        if strategy.user_dp is not None:  # clipping=client: the device clips, the server checks
            reference = strategy.client_payload(global_state, global_state)
            payload = strategy.user_dp.on_device(payload, reference)
        out = {"payload": payload, "metrics": _metrics(cfg, result, partition_id, started)}
        return out, result

    # What travels, as the server declares it: from the strategy not bound to this client.
    declared = build_strategy(cfg).declared_payload(global_state)
    if not cfg.privacy.enabled:
        out, _ = train(None)
        if secure:  # a share of the noised sum, not the update
            reference = strategy.client_payload(global_state, global_state)
            return secure_aggregation.start(
                cfg, msg, context, out["payload"], reference, partition_id, out["metrics"]
            )
        return reply(cfg, msg, out["payload"], out["metrics"], declared)

    key = EventKey(str(config[keys.RUN_ID]), client_id(partition_id), server_round)
    if strategy.uses_own_mechanism():  # e.g. RQM's privacy mode: no DP-SGD, its own release
        key = EventKey(key.run_id, key.client_id, key.round, strategy.name)
        return own_mechanism_round(cfg, msg, key, strategy, global_state, partition_id, declared)

    sigma = strategy.client_noise_multiplier(config)
    plan = local_plan(len(local), cfg.train)
    event = SampledGaussianEvent(q=plan.q, sigma=sigma, steps=plan.steps)

    def release() -> dict:
        out, result = train(sigma)
        if result.event != event:  # never released under another event than the one charged
            raise RuntimeError(f"trained {result.event}, planned and charged {event}")
        return out

    return released_once(cfg, msg, key, event, partition_id, release, declared)


def _canaries(cfg: RunConfig, model: torch.nn.Module) -> CanaryGradients | None:
    plan = canary_plan(cfg)
    if plan is None:
        return None
    clip = required(cfg.privacy.max_grad_norm, "privacy.max_grad_norm")
    params = [p for p in model.parameters() if p.requires_grad]
    return CanaryGradients(plan, params, cfg.audit.canary_scale * clip)


def _metrics(cfg: RunConfig, result: LocalResult, partition_id: int, started: float) -> dict:
    """What a trained round reports. Under DP (record or user level) only the public fields (the
    loss is computed on private data, the timing on the client); without DP the loss and the
    time too."""
    metrics: dict[str, float] = {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.STEPS: result.steps,
        keys.PARTITION_ID: partition_id,
        keys.EPSILON_SPENT: 0.0,
        keys.SAT_OUT: 0,
    }
    if not cfg.privacy.enabled and not cfg.privacy.user_level:
        metrics[keys.TRAIN_LOSS] = result.mean_loss
        metrics[keys.TRAIN_TIME] = time.perf_counter() - started
    return metrics


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        quiet_actor_teardown()  # in the process (a Ray actor) that will log it at the end
        return train_round(cfg or config_from_context(context), msg, context)

    return app


# For SuperNodes in deployment mode: `flwr run` loads `privfed.client.app:app`.
app = make_client_app()
