"""A device's side of a secure user-level round (``privacy.user.aggregation=secure``).

After training (client/app.py), instead of sending its clipped update the device:

1. reads the round's plan from the server's config (privacy/secure_plan.py) and builds the
   round's event for its own update; its own ledger must accept it, and a round it has
   recorded before gets nothing (a second share of the same round, with fresh noise, would be a
   second release under one charge);
2. clips the update to C, rounds it onto the lattice and adds its discrete Gaussian share
   (privacy/distributed_dg.py, from secret streams), **records the event** in its own ledger
   (durable), and only then keeps the share and its SecAgg+ secrets in its node's context and
   replies with its two public keys;
3. answers the three SecAgg+ stages (privacy/secagg.py) from what it kept: encrypted shares of
   its secrets for its neighbours; its masked vector, once (the share is dropped as it is sent);
   the shares it may reveal for the survivors and the dropped, never both for one neighbour.

Nothing data-dependent leaves the device but the masked, noised share, and it leaves after the
event is recorded. The budget is the device's own (privfed-edge's), else the run's per-user
budget kept in the device's own storage, under the device's id with ``/user`` appended.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log

from privfed import keys
from privfed.client.device import LEDGER_FILE, DeviceBudget
from privfed.client.release_protocol import device_storage, sat_out
from privfed.config import RunConfig
from privfed.privacy import distributed_dg, secagg, user_level
from privfed.privacy.invariants import PrivacyInvariantError, required
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.secure_plan import device_event
from privfed.randomness import RandomStream
from privfed.tensors import State, flatten

_DEVICE = "privfed.secagg-device"  # context.state: the SecAgg+ Device of the round
_SHARE = "privfed.secagg-share"  # context.state: the lattice share, until it is masked
_COUNTED = "privfed.secagg-counted"  # context.state: the survivors its recorded event counts on
EVENT_NAME = "secure_aggregation"


def _ledger(cfg: RunConfig, config: ConfigRecord, client: str) -> tuple[Ledger, str]:
    """The device's ledger and the id its user-level events go under."""
    budget = DeviceBudget.from_env()
    if budget is not None:  # an edge device: its one budget covers everything it releases
        return budget.ledger(client), client
    user = cfg.privacy.user
    ledger = Ledger(device_storage(config) / client / LEDGER_FILE)
    name = f"{client}/user"
    ledger.set_budget(name, required(user.epsilon, "privacy.user.epsilon"), user.delta)
    return ledger, name


def start(
    cfg: RunConfig,
    msg: Message,
    context: Context,
    payload: State,
    reference: State,
    partition_id: int,
    metrics: dict,
) -> Message:
    """Stage 1, after training: the share made and charged, the secrets kept, the keys sent."""
    config = msg.content.config_records[keys.CONFIG]
    server_round = keys.integer(config, keys.SERVER_ROUND)
    update = flatten(user_level.update_of(payload, reference))
    event = device_event(dict(config), update.numel())
    ledger, name = _ledger(cfg, config, keys.client_id(partition_id))
    key = EventKey(str(config[keys.RUN_ID]), name, server_round, EVENT_NAME)
    if ledger.has(key):  # released before: never a second share of the same round
        return sat_out(cfg, msg, partition_id, ledger.spent(name), round_in_progress=1)
    planned = ledger.plan(name, event)
    if not planned.accepted:
        log(WARNING, "%s: its budget refuses secure round %d", name, server_round)
        return sat_out(cfg, msg, partition_id, planned.epsilon_spent, device_refused=1)
    share = distributed_dg.device_share(
        update,
        event.clip,
        event.gamma,
        event.sigma,
        event.beta,
        keys.integer(config, keys.SECAGG_BITS),
        RandomStream.secret("secagg.rounding"),
        RandomStream.secret("secagg.noise"),
    )
    answer = ledger.report(key, event)  # durable, before anything of the share is masked
    if not answer.accepted:
        return sat_out(cfg, msg, partition_id, answer.epsilon_spent, over_budget=1)
    device = secagg.Device(context.node_id, keys.integer(config, keys.SECAGG_BITS))
    # the survivors its charge counted on: enforced at unmasking, whatever the server asks then
    context.state[_COUNTED] = ConfigRecord({"round": server_round, "survivors": event.devices})
    _keep(context, device, server_round)
    context.state[_SHARE] = ArrayRecord({keys.SECAGG_MASKED: share})
    channel, mask = device.advertise()
    return _reply(
        msg, ConfigRecord({"channel-key": channel, "mask-key": mask}), None, metrics, answer
    )


def _reply(
    msg: Message,
    record: ConfigRecord | None,
    arrays: ArrayRecord | None,
    metrics: dict | None = None,
    answer=None,
) -> Message:
    content = RecordDict()
    public: dict[str, int | float | list[int] | list[float]] = {keys.SAT_OUT: 0}
    if metrics is not None:  # as release_protocol.reply: a private metric is a bug, not dropped
        private = sorted(set(metrics) - keys.PUBLIC_REPLY_METRICS)
        if private:
            raise PrivacyInvariantError(f"a secure reply may not carry {private} (not public)")
        public.update(metrics)
    if answer is not None:
        public[keys.EPSILON_SPENT] = answer.epsilon_spent
    content[keys.METRICS] = MetricRecord(public)
    if record is not None:
        content[keys.SECAGG] = record
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content, reply_to=msg)


def _device(context: Context, server_round: int) -> secagg.Device:
    kept = context.state.config_records.get(_DEVICE)
    if kept is None or kept.get("round") != server_round:
        raise PrivacyInvariantError(f"secure aggregation: no share of round {server_round} here")
    return secagg.Device.from_dict(dict(kept))


def _keep(context: Context, device: secagg.Device, server_round: int) -> None:
    context.state[_DEVICE] = ConfigRecord({**device.to_dict(), "round": server_round})


def stage(msg: Message, context: Context) -> Message:
    """Stages 2-4 (keys.SECAGG_PHASES), from what :func:`start` kept in the node's context."""
    config = msg.content.config_records[keys.CONFIG]
    server_round = keys.integer(config, keys.SERVER_ROUND)
    phase = config[keys.PHASE]
    request = msg.content.config_records[keys.SECAGG]
    device = _device(context, server_round)
    if phase == keys.PHASE_SECAGG_SHARE:
        ids = keys.integers(request, "ids")
        pairs = zip(
            keys.blobs(request, "channel-keys"), keys.blobs(request, "mask-keys"), strict=True
        )
        out = device.share_keys(
            dict(zip(ids, pairs, strict=True)), keys.integer(request, "threshold")
        )
        _keep(context, device, server_round)
        return _reply(
            msg, ConfigRecord({"ids": list(out), "ciphertexts": list(out.values())}), None
        )
    if phase == keys.PHASE_SECAGG_MASK:
        incoming = zip(
            keys.integers(request, "ids"), keys.blobs(request, "ciphertexts"), strict=True
        )
        device.receive_shares(dict(incoming))
        kept = context.state.array_records.get(_SHARE)
        if kept is None:  # masked once: a second vector would tell two masks' difference
            raise PrivacyInvariantError("secure aggregation: the share was masked and sent already")
        share = kept.to_torch_state_dict()[keys.SECAGG_MASKED]
        del context.state[_SHARE]
        masked = device.masked_input(share)
        _keep(context, device, server_round)
        return _reply(msg, None, ArrayRecord({keys.SECAGG_MASKED: masked}))
    if phase == keys.PHASE_SECAGG_UNMASK:
        survived, dropped = keys.integers(request, "survived"), keys.integers(request, "dropped")
        counted = context.state.config_records[_COUNTED]
        if counted.get("round") != server_round:
            raise PrivacyInvariantError(f"secure aggregation: no charge of round {server_round}")
        # the device's own count, not the request's: its epsilon assumed that many survivors
        floor = max(keys.integer(counted, "survivors"), keys.integer(request, "min-survivors"))
        out = device.unmask_shares(survived, dropped, floor)
        _keep(context, device, server_round)
        return _reply(msg, ConfigRecord({"ids": list(out), "shares": list(out.values())}), None)
    raise ValueError(f"secure aggregation: unknown phase {phase!r}")
