"""The Flower ClientApp: DP-SGD local training of the adapter, accounted before it replies.

One round on a client (ARCHITECTURE.md "How one round flows"):
1. load the broadcast adapter state; only the tensors the strategy trains get gradients;
2. ask the accountant whether this round's event fits the client's budget; if not, sit out
   (reply ``sat-out``, no payload: nothing is trained, nothing is spent);
3. run DP-SGD (Opacus), record the event in the ledger (durable and idempotent) and only then
4. reply with exactly what the strategy says travels.

In simulation the validated config is bound in by :func:`make_client_app`; a deployed
ClientApp (``app`` below, run by a SuperNode) reads it from ``context.run_config``.
"""

from __future__ import annotations

import base64
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privfed import keys
from privfed.config import RunConfig
from privfed.data.federated import federated_data
from privfed.models.backbone import (
    adapter_names,
    adapter_state,
    fresh_model,
    load_adapter_state,
    set_trainable,
)
from privfed.privacy.dp_sgd import local_plan, round_seed, train_local
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.ledger import EventKey, Ledger
from privfed.strategies.registry import build_strategy


def client_id(partition_id: int) -> str:
    return f"client-{partition_id}"


def config_from_context(context: Context) -> RunConfig:
    """The validated config a deployment carries in ``run_config`` (base64 JSON, so that TOML
    quoting never mangles it)."""
    raw = context.run_config.get(keys.RUN_CONFIG_JSON)
    if not isinstance(raw, str) or not raw:
        raise RuntimeError(f"run_config has no {keys.RUN_CONFIG_JSON!r}: submit with `privfed`")
    return RunConfig.model_validate_json(base64.b64decode(raw))


def _sat_out(msg: Message, partition_id: int, spent: float) -> Message:
    metrics = MetricRecord({keys.SAT_OUT: 1, keys.PARTITION_ID: partition_id,
                            keys.EPSILON_SPENT: spent})
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def train_round(cfg: RunConfig, msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    torch.set_num_threads(max(1, int(cfg.federation.client_resources.num_cpus)))
    partition_id = int(context.node_config[keys.NODE_PARTITION_ID])
    config = msg.content.config_records[keys.CONFIG]
    server_round = int(config[keys.SERVER_ROUND])
    strategy = build_strategy(cfg).on_client(partition_id)

    data = federated_data(cfg)
    local = data.client(partition_id)
    model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size)
    global_state = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
    names = adapter_names(model)
    load_adapter_state(model, global_state)
    set_trainable(model, names, strategy.trainable)

    ledger: Ledger | None = None
    event_key: EventKey | None = None
    sigma: float | None = None
    if cfg.privacy.enabled:
        sigma = float(config[keys.NOISE_MULTIPLIER])
        plan = local_plan(len(local), cfg.train)
        planned = SampledGaussianEvent(q=plan.q, sigma=sigma, steps=plan.steps)
        ledger = Ledger(str(config[keys.LEDGER_PATH]))
        event_key = EventKey(str(config[keys.RUN_ID]), client_id(partition_id), server_round)
        answer = ledger.plan(event_key.client_id, planned)
        # An already recorded round (a re-run after a resume) may proceed at no extra cost.
        if not answer.accepted and not ledger.has(event_key):
            return _sat_out(msg, partition_id, answer.epsilon_spent)

    result = train_local(
        model, local, cfg.train, cfg.privacy, sigma,
        seed=round_seed(cfg.seed, partition_id, server_round), device=cfg.model.device,
    )

    spent = 0.0
    if ledger is not None and event_key is not None and result.event is not None:
        # Durable before anything leaves the client; a repeat of this key is a no-op.
        answer = ledger.report(event_key, result.event)
        if not answer.accepted:  # a concurrent report used the budget first
            return _sat_out(msg, partition_id, answer.epsilon_spent)
        spent = answer.epsilon_spent

    local_state = adapter_state(model, names)
    payload = strategy.client_payload(global_state, local_state)
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: result.mean_loss,
        keys.STEPS: result.steps,
        keys.PARTITION_ID: partition_id,
        keys.EPSILON_SPENT: spent,
        keys.SAT_OUT: 0,
        keys.TRAIN_TIME: time.perf_counter() - started,
    })
    content = RecordDict({keys.ARRAYS: ArrayRecord(payload), keys.METRICS: metrics})
    return Message(content, reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_round(cfg or config_from_context(context), msg, context)

    return app


# For SuperNodes in deployment mode: `flwr run` loads `privfed.client.app:app`.
app = make_client_app()
