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

import base64
import time
from pathlib import Path

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
from privfed.privacy.dp_sgd import (
    LocalResult,
    local_plan,
    round_learning_rate,
    round_seed,
    train_local,
)
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.releases import ReleaseStore
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
    metrics = MetricRecord(
        {keys.SAT_OUT: 1, keys.PARTITION_ID: partition_id, keys.EPSILON_SPENT: spent}
    )
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def train_round(cfg: RunConfig, msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    torch.set_num_threads(max(1, int(cfg.federation.client_resources.num_cpus)))
    partition_id = int(context.node_config[keys.NODE_PARTITION_ID])
    config = msg.content.config_records[keys.CONFIG]
    server_round = int(config[keys.SERVER_ROUND])
    strategy = build_strategy(cfg).on_client(partition_id)
    global_state = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
    local = federated_data(cfg).client(partition_id)

    def train(sigma: float | None) -> tuple[dict, dict, LocalResult]:
        data = federated_data(cfg)
        model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size)
        names = adapter_names(model)
        load_adapter_state(model, global_state)
        set_trainable(model, names, strategy.trainable)
        result = train_local(
            model,
            local,
            cfg.train,
            cfg.privacy,
            sigma,
            seed=round_seed(cfg.seed, partition_id, server_round),
            device=cfg.model.device,
            learning_rate=round_learning_rate(cfg.train, server_round, cfg.num_rounds),
        )
        payload = strategy.client_payload(global_state, adapter_state(model, names))
        metrics = _metrics(result, partition_id, started)
        return payload, metrics, result

    if not cfg.privacy.enabled:
        payload, metrics, _ = train(None)
        return _reply(msg, payload, metrics)

    sigma = float(config[keys.NOISE_MULTIPLIER])
    ledger_path = Path(str(config[keys.LEDGER_PATH]))
    ledger = Ledger(ledger_path)
    releases = ReleaseStore(ledger_path.parent / "releases")
    key = EventKey(str(config[keys.RUN_ID]), client_id(partition_id), server_round)

    stored = releases.load(key)
    if stored is not None:
        # This round was released before (a re-run after a resume): send the same bytes again.
        answer = ledger.report(key, stored["event"])
        if not answer.accepted:
            return _sat_out(msg, partition_id, answer.epsilon_spent)
        metrics = {**stored["metrics"], keys.EPSILON_SPENT: answer.epsilon_spent}
        return _reply(msg, stored["payload"], metrics)
    if ledger.has(key):
        # Charged, but the release is lost: a new release would be a second, uncharged one.
        return _sat_out(msg, partition_id, ledger.spent(key.client_id))

    plan = local_plan(len(local), cfg.train)
    answer = ledger.plan(
        key.client_id, SampledGaussianEvent(q=plan.q, sigma=sigma, steps=plan.steps)
    )
    if not answer.accepted:
        return _sat_out(msg, partition_id, answer.epsilon_spent)

    payload, metrics, result = train(sigma)
    assert result.event is not None
    # Order matters: store the release, record the event (durable), and only then reply.
    releases.save(key, {"payload": payload, "metrics": metrics, "event": result.event})
    answer = ledger.report(key, result.event)
    if not answer.accepted:  # a concurrent report used the budget first: release nothing
        return _sat_out(msg, partition_id, answer.epsilon_spent)
    return _reply(msg, payload, {**metrics, keys.EPSILON_SPENT: answer.epsilon_spent})


def _metrics(result: LocalResult, partition_id: int, started: float) -> dict:
    return {
        keys.NUM_EXAMPLES: result.num_examples,
        keys.TRAIN_LOSS: result.mean_loss,
        keys.STEPS: result.steps,
        keys.PARTITION_ID: partition_id,
        keys.EPSILON_SPENT: 0.0,
        keys.SAT_OUT: 0,
        keys.TRAIN_TIME: time.perf_counter() - started,
    }


def _reply(msg: Message, payload: dict, metrics: dict) -> Message:
    content = RecordDict({keys.ARRAYS: ArrayRecord(payload), keys.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_round(cfg or config_from_context(context), msg, context)

    return app


# For SuperNodes in deployment mode: `flwr run` loads `privfed.client.app:app`.
app = make_client_app()
