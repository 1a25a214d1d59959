"""Reserve, plan, release, store, record, reply: the order that keeps every release charged once.

For one key (run, client, round, event):

1. **reserve** the key on the client's own disk (privacy/releases.py): a second execution of
   it while this one runs sits out;
2. a key released before (a resumed run asks again) re-sends exactly the stored bytes; a key
   charged but whose release is lost sits out (a new release would be a second, uncharged one);
3. **plan**: the event must fit the device's own budget (client/device.py, edge devices) and
   the run's accountant; if not, sit out before anything is computed. Under user-level DP
   (``privacy.unit=user``) the run's accountant is not told: which devices report would say
   which were sampled. Each device then accounts its record-level DP-SGD on its own ledger
   (edge devices: their own; simulated ones: in their own storage, ``<run>.devices``);
4. **release** (train), **store** it durably, **record** the event in the device's ledger and
   the accountant's (durable, idempotent), and only then
5. **reply**, with the release and the public fields of ``keys.PUBLIC_REPLY_METRICS`` only,
   and with exactly the tensors the strategy declares (names, shapes, dtypes): nothing else
   rides along with a release.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from privfed import keys
from privfed.client.device import LEDGER_FILE, DeviceBudget
from privfed.config import RunConfig
from privfed.privacy.backends import client_accountant
from privfed.privacy.events import PrivacyEvent
from privfed.privacy.invariants import PrivacyInvariantError, required
from privfed.privacy.ledger import Answer, EventKey, Ledger
from privfed.privacy.releases import ReleaseStore
from privfed.privacy.service.client import AccountantClient, AccountantUnavailable
from privfed.strategies.replies import InvalidReply, validate_structure
from privfed.tensors import State

RELEASES_ENV = "PRIVFED_RELEASES_DIR"  # where an edge client keeps its releases (its own disk)


def device_storage(config) -> Path:
    """Where a simulated device keeps what is its own (the run's config names it)."""
    return Path(str(config[keys.DEVICES_DIR]))


def device_budget(cfg: RunConfig, config, client: str) -> DeviceBudget | None:
    """The device's own budget: an edge device's (privfed-edge --epsilon), else under user-level
    DP the run's per-device budget, kept in the device's own storage (nobody else's ledger
    may learn that it was sampled)."""
    budget = DeviceBudget.from_env()
    if budget is not None or not cfg.privacy.user_level:
        return budget
    return DeviceBudget(
        required(cfg.privacy.epsilon, "privacy.epsilon"),
        required(cfg.privacy.delta, "privacy.delta"),
        device_storage(config) / client / LEDGER_FILE,
    )


def reply(
    cfg: RunConfig,
    msg: Message,
    payload: State | None,
    metrics: dict,
    declared: State | None = None,
) -> Message:
    """The reply Message; under DP it may carry only public metrics beside the payload, and a
    payload only the tensors ``declared`` names, with their shapes and dtypes."""
    if cfg.privacy.enabled:
        private = sorted(set(metrics) - keys.PUBLIC_REPLY_METRICS)
        if private:
            raise PrivacyInvariantError(f"a DP reply may not carry {private} (not public)")
    if payload is not None:
        if declared is None:
            raise PrivacyInvariantError("a payload must be checked against what is declared")
        try:
            validate_structure(payload, declared)
        except InvalidReply as err:
            raise PrivacyInvariantError(
                f"a reply may carry the declared tensors only: {err}"
            ) from None
    content = RecordDict({keys.METRICS: MetricRecord(metrics)})
    if payload is not None:
        content[keys.ARRAYS] = ArrayRecord(payload)
    return Message(content, reply_to=msg)


def sat_out(
    cfg: RunConfig, msg: Message, partition_id: int, spent: float, **reason: int
) -> Message:
    """No payload: nothing trained, nothing released. ``reason``: e.g. ``device_refused=1``."""
    metrics = {keys.SAT_OUT: 1, keys.PARTITION_ID: partition_id, keys.EPSILON_SPENT: spent}
    metrics.update({k.replace("_", "-"): v for k, v in reason.items()})
    return reply(cfg, msg, None, metrics)


def released_once(
    cfg: RunConfig,
    msg: Message,
    key: EventKey,
    event: PrivacyEvent,
    partition_id: int,
    release: Callable[[], dict],
    declared: State,
) -> Message:
    """Run ``release`` (returning ``{"payload", "metrics"}``) at most once for ``key``, charged
    to the device's ledger (if any) and the run's accountant before the reply leaves, whose
    payload is exactly ``declared``'s tensors."""
    config = msg.content.config_records[keys.CONFIG]
    releases_dir = os.environ.get(RELEASES_ENV) or device_storage(config) / "releases"
    releases = ReleaseStore(Path(releases_dir))
    budget = device_budget(cfg, config, key.client_id)
    device = budget.ledger(key.client_id) if budget is not None else None
    with releases.reservation(key) as held:
        if not held:
            log(INFO, "%s: another execution holds %s; sitting out", key.client_id, key)
            return sat_out(cfg, msg, partition_id, float("nan"), round_in_progress=1)
        try:
            ledger = None
            if not cfg.privacy.user_level:  # the run's accountant: told of record level only
                ledger = client_accountant(
                    cfg.privacy, key.client_id, Path(str(config[keys.LEDGER_PATH]))
                )
            return _release_accounted(
                cfg, msg, key, event, partition_id, release, declared, ledger, device, releases
            )
        except AccountantUnavailable as err:
            # No answer from the accountant: nothing is trained, nothing is released.
            log(WARNING, "%s: accountant unreachable, sitting out: %s", key.client_id, err)
            return sat_out(cfg, msg, partition_id, float("nan"), accountant_unreachable=1)


def _release_accounted(
    cfg: RunConfig,
    msg: Message,
    key: EventKey,
    event: PrivacyEvent,
    partition_id: int,
    release: Callable[[], dict],
    declared: State,
    ledger: Ledger | AccountantClient | None,
    device: Ledger | None,
    releases: ReleaseStore,
) -> Message:
    stored = releases.load(key)
    if stored is not None:  # released before: the same bytes again, charged once
        answer = _record(key, stored["event"], ledger, device)
        if not answer.accepted:
            return sat_out(cfg, msg, partition_id, answer.epsilon_spent, over_budget=1)
        metrics = {**stored["metrics"], keys.EPSILON_SPENT: answer.epsilon_spent}
        return reply(cfg, msg, stored["payload"], metrics, declared)
    accounts = [a for a in (device, ledger) if a is not None]
    if not accounts:
        raise PrivacyInvariantError(f"{key}: no ledger would record this release")
    if any(a.has(key) for a in accounts):
        return sat_out(cfg, msg, partition_id, accounts[-1].spent(key.client_id))
    if device is not None:
        mine = device.plan(key.client_id, event)
        if not mine.accepted:
            log(
                WARNING,
                "%s: this device refuses %s: %s would bring it to epsilon=%.4g, over its own "
                "budget of %.4g (delta=%g); sitting out, nothing trained or sent",
                key.client_id,
                key,
                event.to_json(),
                mine.epsilon_after,
                mine.epsilon_budget,
                mine.delta,
            )
            return sat_out(cfg, msg, partition_id, mine.epsilon_spent, device_refused=1)
    if ledger is not None:
        answer = ledger.plan(key.client_id, event)
        if not answer.accepted:
            return sat_out(cfg, msg, partition_id, answer.epsilon_spent, over_budget=1)
    out = release()
    # Order matters: store the release, record the event (durable), and only then reply.
    releases.save(key, {"payload": out["payload"], "metrics": out["metrics"], "event": event})
    answer = _record(key, event, ledger, device)
    if not answer.accepted:  # a concurrent report used the budget first: release nothing
        return sat_out(cfg, msg, partition_id, answer.epsilon_spent, over_budget=1)
    metrics = {**out["metrics"], keys.EPSILON_SPENT: answer.epsilon_spent}
    return reply(cfg, msg, out["payload"], metrics, declared)


def _record(
    key: EventKey,
    event: PrivacyEvent,
    ledger: Ledger | AccountantClient | None,
    device: Ledger | None,
) -> Answer:
    """Record on the device first (the guarantee), then with the run's accountant."""
    answer = None
    if device is not None:
        answer = device.report(key, event)
        if not answer.accepted:
            return answer
    if ledger is not None:
        answer = ledger.report(key, event)
    if answer is None:
        raise PrivacyInvariantError(f"{key}: no ledger recorded this release")
    return answer
