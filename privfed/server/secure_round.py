"""The server's side of a secure user-level round (``privacy.user.aggregation=secure``).

The round's training messages went out as usual; each device that trained replied with its two
SecAgg+ public keys, not its update (client/secure_aggregation.py). This module runs the three
remaining stages over the grid and learns one thing: the sum, in Z_(2^bits), of the survivors'
lattice shares, which it decodes into the noised sum of their clipped updates and releases
as DP-FedAvg's mean (post-processing). The stages (privacy/secagg.py):

2. each device gets its neighbours' keys and returns encrypted shares of its secrets;
3. each device gets the shares addressed to it and returns its masked vector;
4. each device is told who sent a masked vector and who did not, and returns the shares it may
   reveal; the server rebuilds the survivors' self masks and the dropped devices' mask keys.

Fewer than the planned survivors at stage 3, or a secret with fewer than its threshold of shares
at stage 4, abort the round: nothing is released, the model stays as it was, and each device
keeps the charge it recorded before masking (it cannot know whether the server learnt a sum).
The neighbourhood graph is drawn from a secret stream (the SecAgg+ paper draws it at random; a
server that chose it could surround a device with colluders).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from privfed import keys
from privfed.privacy import distributed_dg, secagg
from privfed.randomness import RandomStream
from privfed.strategies.base import AdapterStrategy
from privfed.strategies.replies import RoundOutcome
from privfed.tensors import State, unflatten


def _exchange(
    grid: Grid, rnd: int, base: dict, phase: str, requests: dict[int, RecordDict], timeout: float
) -> dict[int, Message]:
    """One stage: a request to each device, the replies that are not errors, by device."""
    messages = []
    for node, content in requests.items():
        config = ConfigRecord({**base, keys.SERVER_ROUND: rnd, keys.PHASE: phase})
        content[keys.CONFIG] = config
        messages.append(Message(content, message_type=MessageType.TRAIN, dst_node_id=node))
    replies = grid.send_and_receive(messages, timeout=timeout)
    return {m.metadata.src_node_id: m for m in replies if not m.has_error()}


def _pairs(msg: Message, values: str) -> dict[int, bytes] | None:
    """A stage reply's ``ids`` -> ``values``; None if malformed (then it counts as missing)."""
    try:
        record = msg.content.config_records[keys.SECAGG]
        return dict(zip(keys.integers(record, "ids"), keys.blobs(record, values), strict=True))
    except (KeyError, ValueError):
        return None


def _graph_seed() -> int:
    return int(RandomStream.secret("secagg.graph").uniform(1)[0] * 2**53)


def aggregate(
    grid: Grid,
    strategy: AdapterStrategy,
    rnd: int,
    replies: Iterable[Message],
    sent: RoundOutcome,
    base: dict,
    timeout: float,
) -> tuple[State | None, RoundOutcome]:
    """The round's release from the training replies (public keys) and stages 2-4; None when
    the round aborts."""
    user_dp = strategy.user_dp
    if user_dp is None or not user_dp.secure:
        raise ValueError("secure_round.aggregate: privacy.user.aggregation=secure only")
    plan = user_dp.secure_plan
    out = RoundOutcome(sampled=sent.sampled, bytes_down=sent.bytes_down)
    out.extra = {"secure_aborted": 0}
    advertised: dict[int, tuple[bytes, bytes]] = {}
    for msg in replies:
        if msg.has_error():
            out.failed += 1
            continue
        record = msg.content.config_records.get(keys.SECAGG)
        if record is None:  # sat out: nothing trained, nothing to sum
            out.sat_out += 1
            continue
        try:
            keys_ = (keys.blob(record, "channel-key"), keys.blob(record, "mask-key"))
        except (KeyError, ValueError):  # malformed: rejected and counted, the round goes on
            out.rejected += 1
            continue
        advertised[msg.metadata.src_node_id] = keys_

    def abort(why: str) -> tuple[None, RoundOutcome]:
        # no counts in the log: under user-level DP they are withheld (server/report.py)
        log(WARNING, "round %d: secure aggregation aborted (%s); nothing released", rnd, why)
        out.extra = {"secure_aborted": 1}
        return None, out

    if len(advertised) < plan.survivors:
        return abort("fewer devices trained than the planned survivors")
    settings = strategy.cfg.privacy.user.secure
    degree = settings.neighbours or len(advertised) - 1
    graph = secagg.neighbourhoods(sorted(advertised), degree, random.Random(_graph_seed()))
    size = min(len(v) for v in graph.values()) + 1  # a neighbourhood, the device included
    threshold = max(2, math.ceil(settings.threshold * size))
    # stage 2: the neighbours' keys in, encrypted shares out
    requests = {}
    for node, neighbours in graph.items():
        ids = sorted(neighbours)
        record = ConfigRecord(
            {
                "ids": ids,
                "channel-keys": [advertised[v][0] for v in ids],
                "mask-keys": [advertised[v][1] for v in ids],
                "threshold": threshold,
            }
        )
        requests[node] = RecordDict({keys.SECAGG: record})
    got = _exchange(grid, rnd, base, keys.PHASE_SECAGG_SHARE, requests, timeout)
    outbox = {src: box for src, m in got.items() if (box := _pairs(m, "ciphertexts")) is not None}
    shared = set(outbox)
    # stage 3: each device's incoming shares in, its masked vector out
    requests = {}
    for node in shared:
        incoming = {src: box[node] for src, box in outbox.items() if node in box}
        senders: list[int] = list(incoming)
        record = ConfigRecord({"ids": senders, "ciphertexts": list(incoming.values())})
        requests[node] = RecordDict({keys.SECAGG: record})
    got = _exchange(grid, rnd, base, keys.PHASE_SECAGG_MASK, requests, timeout)
    masked = {
        node: m.content.array_records[keys.ARRAYS].to_torch_state_dict()[keys.SECAGG_MASKED]
        for node, m in got.items()
    }
    if len(masked) < plan.survivors:
        return abort("fewer masked vectors than the planned survivors")
    # stage 4: who survived in, the shares each may reveal out
    survived, dropped = sorted(masked), sorted(shared - set(masked))
    requests = {
        node: RecordDict(
            {
                keys.SECAGG: ConfigRecord(
                    {"survived": survived, "dropped": dropped, "min-survivors": plan.survivors}
                )
            }
        )
        for node in masked
    }
    got = _exchange(grid, rnd, base, keys.PHASE_SECAGG_UNMASK, requests, timeout)
    revealed = {
        node: pairs for node, m in got.items() if (pairs := _pairs(m, "shares")) is not None
    }
    try:
        total = secagg.unmask_sum(
            masked,
            revealed,
            advertised,
            graph,
            shared,
            threshold,
            plan.bits,
        )
    except secagg.RoundAborted:
        return abort("a secret with fewer shares than its threshold")
    reference = strategy.client_payload(strategy.global_state, strategy.global_state)
    summed = unflatten(distributed_dg.decode(total, plan.gamma, plan.bits), reference)
    released = user_dp.release_secure(reference, summed)
    out.trained = len(masked)
    new_state = strategy.aggregate(strategy.global_state, [released], [1.0])  # post-processing
    strategy.global_state = new_state
    return new_state, out
