"""The Flower ClientApp: DP-SGD local training of the adapter, accounted before it replies.

One round on a client (ARCHITECTURE.md "How one round flows"):
1. load the broadcast adapter state; only the tensors the strategy trains get gradients;
2. ask the accountant whether this round's event fits the client's budget; if not, sit out
   (reply ``sat-out``, no payload: nothing is trained, nothing is spent);
3. run DP-SGD (Opacus), store the release, record the event in the ledger (durable and
   idempotent) and only then
4. reply with exactly what the strategy says travels. A re-run of an already released round
   (after a resume) sends the stored release again (see privacy/releases.py).

In simulation the validated config is bound in by :func:`make_client_app`; a deployed
ClientApp (``app`` below, run by a SuperNode) reads it from ``context.run_config``.
"""

from __future__ import annotations

import secrets
import time
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import log

from privfed import keys
from privfed.audit.canaries import CanaryGradients, CanaryObservation
from privfed.audit.faults import mechanism_fault, with_fault
from privfed.audit.report import write_observation
from privfed.client.context import config_from_context
from privfed.client.device import DeviceBudget
from privfed.client.release_protocol import released_once, reply, sat_out
from privfed.config import RunConfig
from privfed.data.federated import federated_data
from privfed.keys import client_id
from privfed.models.backbone import (
    adapter_names,
    adapter_state,
    fresh_model,
    load_adapter_state,
    set_trainable,
)
from privfed.privacy.dp_sgd import (
    LocalResult,
    local_plan,
    round_learning_rate,
    round_randomness,
    train_local,
)
from privfed.privacy.events import GaussianEvent, SampledGaussianEvent
from privfed.privacy.gradients import clipped_gradient_sum, gaussian_noise_like
from privfed.privacy.invariants import PrivacyInvariantError, required
from privfed.privacy.ledger import EventKey
from privfed.randomness import RandomStream, public_seed
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.registry import build_strategy
from privfed.telemetry.console import quiet_actor_teardown


def train_round(cfg: RunConfig, msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    torch.set_num_threads(max(1, int(cfg.federation.client_resources.num_cpus)))
    partition_id = int(context.node_config[keys.NODE_PARTITION_ID])
    device = DeviceBudget.from_env()
    refusal = device.refusal(cfg) if device is not None else None
    if refusal is not None:
        log(WARNING, "%s: this device refuses the run: %s", client_id(partition_id), refusal)
        return sat_out(cfg, msg, partition_id, float("nan"), device_refused=1)
    config = msg.content.config_records[keys.CONFIG]
    server_round = keys.integer(config, keys.SERVER_ROUND)
    strategy = build_strategy(cfg).on_client(partition_id, server_round)
    global_state = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
    local = federated_data(cfg).client(partition_id)
    if config.get(keys.PHASE) == keys.PHASE_INIT:
        return init_round(cfg, msg, strategy, global_state, partition_id, started)

    def train(sigma: float | None) -> tuple[dict, LocalResult]:
        model, names = _global_model(cfg, strategy, global_state)
        canaries = _canaries(cfg, model)
        observer = None
        if canaries is not None:  # an audit: the auditors see each step's release
            observer = CanaryObservation(canaries, canaries.plan.owned_by(partition_id))
        result = train_local(
            model,
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
            canaries=canaries,
            on_release=observer,
            fault=mechanism_fault(cfg.audit.break_mechanism),
        )
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
        payload = strategy.client_payload(global_state, adapter_state(model, names))
        out = {"payload": payload, "metrics": _metrics(cfg, result, partition_id, started)}
        return out, result

    if not cfg.privacy.enabled:
        out, _ = train(None)
        return reply(cfg, msg, out["payload"], out["metrics"])

    key = EventKey(str(config[keys.RUN_ID]), client_id(partition_id), server_round)
    if strategy.uses_own_mechanism():  # e.g. RQM's privacy mode: no DP-SGD, its own release
        key = EventKey(key.run_id, key.client_id, key.round, strategy.name)
        return _own_mechanism_round(cfg, msg, key, strategy, global_state, partition_id)

    sigma = strategy.client_noise_multiplier(config)
    plan = local_plan(len(local), cfg.train)
    event = SampledGaussianEvent(q=plan.q, sigma=sigma, steps=plan.steps)

    def release() -> dict:
        out, result = train(sigma)
        if result.event != event:  # never released under another event than the one charged
            raise RuntimeError(f"trained {result.event}, planned and charged {event}")
        return out

    return released_once(cfg, msg, key, event, partition_id, release)


def _canaries(cfg: RunConfig, model: torch.nn.Module) -> CanaryGradients | None:
    plan = federated_data(cfg).canaries
    if plan is None:
        return None
    clip = required(cfg.privacy.max_grad_norm, "privacy.max_grad_norm")
    params = [p for p in model.parameters() if p.requires_grad]
    return CanaryGradients(plan, params, cfg.audit.canary_scale * clip)


def _global_model(
    cfg: RunConfig, strategy: AdapterStrategy, global_state: dict
) -> tuple[torch.nn.Module, list[str]]:
    """A fresh model with the broadcast adapter state; only what the strategy trains has
    gradients. Returns it with its adapter tensor names."""
    data = federated_data(cfg)
    model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size, strategy.adapter)
    names = adapter_names(model)
    load_adapter_state(model, global_state)
    set_trainable(model, names, strategy.trainable)
    return model, names


def _own_mechanism_round(
    cfg: RunConfig,
    msg: Message,
    key: EventKey,
    strategy: AdapterStrategy,
    global_state: dict,
    partition_id: int,
) -> Message:
    """A round whose release is the strategy's own mechanism (charged as its planned event)."""
    local = federated_data(cfg).client(partition_id)
    model, _ = _global_model(cfg, strategy, global_state)
    dims = sum(p.numel() for p in model.parameters() if p.requires_grad)
    event = strategy.planned_event(len(local), dims)

    def release() -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(secrets.randbits(63))  # dropout: fresh, like every DP round
            payload = strategy.private_release(
                model, local, cfg.train.physical_batch_size, cfg.model.device
            )
        metrics = {
            keys.NUM_EXAMPLES: len(local),
            keys.STEPS: 1,
            keys.PARTITION_ID: partition_id,
            keys.SAT_OUT: 0,
        }
        return {"payload": payload, "metrics": metrics}

    return released_once(cfg, msg, key, event, partition_id, release)


def init_round(
    cfg: RunConfig,
    msg: Message,
    strategy: AdapterStrategy,
    global_state: dict,
    partition_id: int,
    started: float,
) -> Message:
    """A strategy's one-off initialisation release (Fed-SB's svd init): the sum of per-example
    gradients of the named weights over the whole local dataset, clipped to L2 norm C, plus
    N(0, (sigma_init C)^2) noise from a fresh secret stream: one Gaussian mechanism, charged
    like every other release."""
    config = msg.content.config_records[keys.CONFIG]
    data = federated_data(cfg)
    local = data.client_examples(partition_id)  # an audit's canaries enter DP-SGD only
    names = strategy.init_gradient_names(global_state)
    private = cfg.privacy.enabled

    def release() -> dict:
        model = fresh_model(
            cfg.model, data.num_classes, cfg.seed, data.vocab_size, strategy.adapter
        )
        load_adapter_state(model, global_state)
        dropout = secrets.randbits(63) if private else public_seed(cfg.seed, "init.dropout")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(dropout)
            sums = clipped_gradient_sum(
                model,
                local,
                names,
                clip="l2" if private else "none",
                bound=cfg.privacy.max_grad_norm,
                batch_size=cfg.train.physical_batch_size,
                device=cfg.model.device,
            )
        metrics: dict[str, float] = {
            keys.NUM_EXAMPLES: len(local),
            keys.PARTITION_ID: partition_id,
            keys.SAT_OUT: 0,
        }
        if private:
            (event,) = strategy.init_events()
            if not isinstance(event, GaussianEvent):
                raise PrivacyInvariantError(f"{strategy.name}: the init release is not Gaussian")
            clip = required(cfg.privacy.max_grad_norm, "privacy.max_grad_norm")
            noise = gaussian_noise_like(
                sums,
                event.sigma * clip,
                RandomStream.secret(f"{strategy.name}.init_noise"),
            )
            sums = {n: sums[n] + noise[n] for n in sums}
        else:
            metrics[keys.TRAIN_TIME] = time.perf_counter() - started
        return {"payload": sums, "metrics": metrics}

    if not private:
        out = release()
        return reply(cfg, msg, out["payload"], out["metrics"])
    (event,) = strategy.init_events()
    key = EventKey(str(config[keys.RUN_ID]), client_id(partition_id), 0, f"{strategy.name}_init")
    return released_once(cfg, msg, key, event, partition_id, release)


def _metrics(cfg: RunConfig, result: LocalResult, partition_id: int, started: float) -> dict:
    """What a trained round reports. Under DP only the public fields (the loss is computed on
    private data, the timing on the client); without DP the loss and the time too."""
    metrics: dict[str, float] = {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.STEPS: result.steps,
        keys.PARTITION_ID: partition_id,
        keys.EPSILON_SPENT: 0.0,
        keys.SAT_OUT: 0,
    }
    if not cfg.privacy.enabled:
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
