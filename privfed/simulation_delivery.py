"""One-pass message delivery for Flower's Simulation Engine (cross-device scale).

Flower 1.x's simulation engine hands the ServerApp's messages to the Ray workers from one
thread, ``vce_api.add_messages_to_queue``: every 0.1 s it calls
``state.get_message_ins(node_id, limit=1)`` for *every* registered node, and each call walks
the whole message store, checking every stored message's expiry and federation. With N nodes
and M messages in flight that is N x M checks per sweep, all day, whether or not anything
waits: at 1,000 clients and 100 per round the thread kept one of this machine's two cores
busy (py-spy: 71 s of a 100 s run), taking it from the clients it was meant to feed.

:func:`deliver_pending` does what one sweep of Flower's loop does, in one pass over the store:
the messages still undelivered whose destination is one of the simulated nodes go through
Flower's own validity check (``_check_stored_messages``: expiry, federation; invalid ones are
deleted as Flower deletes them), are stamped ``delivered_at`` exactly as ``get_message_ins``
stamps them, and are queued for the workers. It needs the in-memory link state that
``run_simulation`` always creates; on anything else (another state class, a Flower whose
engine no longer has this loop or whose state has other internals) :func:`install` leaves
Flower's own loop in place and says so at debug level, so a Flower upgrade can make this
slower again but never wrong.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Collection
from queue import Empty, Queue
from typing import Any

_LOG = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.02
"""Between sweeps. Flower waits 0.1 s; a sweep here costs microseconds per message in flight,
so a shorter wait takes most of that latency off every round (it is paid once per round, and
at 10 clients per round it was a third of the round's orchestration)."""

_STATE_INTERNALS = ("lock", "message_ins_store", "_check_stored_messages")
_FLOWER_LOOP_PARAMETERS = ["state", "queue", "nodes_mapping", "f_stop"]


def supports_one_pass(state: Any) -> bool:
    """Whether ``state`` is the in-memory link state whose internals this module relies on."""
    from flwr.server.superlink.linkstate import InMemoryLinkState

    return isinstance(state, InMemoryLinkState) and all(
        hasattr(state, name) for name in _STATE_INTERNALS
    )


def deliver_pending(state: Any, nodes: Collection[int]) -> list:
    """The oldest valid message waiting for each of ``nodes``, marked delivered (so returned
    only once): what ``state.get_message_ins(node_id, limit=1)`` for every node in ``nodes``
    returns, in one pass over the store instead of one per node.
    """
    from flwr.supercore.date import now

    with state.lock:
        waiting = [
            message_id
            for message_id, message in state.message_ins_store.items()
            if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
        ]
        if not waiting:
            return []
        state._check_stored_messages(set(waiting))  # expired or foreign: deleted, as Flower does
        first: dict[int, Any] = {}  # one per node and sweep, as Flower's limit=1
        for message_id in waiting:
            message = state.message_ins_store.get(message_id)
            if message is not None:
                first.setdefault(message.metadata.dst_node_id, message)
        pending = list(first.values())
        delivered_at = now().isoformat()
        for message in pending:
            message.metadata.delivered_at = delivered_at
    return pending


def add_messages_to_queue(
    state: Any,
    queue: Queue,
    nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """Drop-in for Flower's ``vce_api.add_messages_to_queue`` (same arguments, same effect)."""
    if not supports_one_pass(state):
        _LOG.debug("link state %s: Flower's own per-node delivery loop", type(state).__name__)
        if _flower_loop is None:
            raise RuntimeError("simulation_delivery: install() first")
        _flower_loop(state, queue, nodes_mapping, f_stop)
        return
    nodes = frozenset(nodes_mapping)
    while not f_stop.is_set():
        for message in deliver_pending(state, nodes):
            queue.put(message)
        f_stop.wait(SWEEP_INTERVAL_S)


_flower_loop: Callable[..., None] | None = None  # Flower's, kept by install()
_FLOWER_STORE_PARAMETERS = ["state", "queue", "f_stop"]


def put_message_into_state(state: Any, queue: Queue, f_stop: threading.Event) -> None:
    """Drop-in for Flower's ``vce_api.put_message_into_state`` (same arguments, same effect: a
    worker's reply stored in the link state) that also sets the server's "reply stored" event
    (server/progress.stored_replies) after each, so that the server asks for replies when
    there are some, not on a timer: at 100 clients a round it asked ~360 times a round, each
    ask a pass over every message still awaited (0.17 s of a 4.2 s round, on the cores the
    clients train on)."""
    from privfed.server.progress import announce_stored_replies

    stored = announce_stored_replies()
    while not f_stop.is_set():
        try:
            message = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(message)
        stored.set()


def install() -> bool:
    """Use :func:`add_messages_to_queue` in Flower's simulation engine; True if it is in use.
    Also :func:`put_message_into_state`, where Flower's has the same signature.

    Idempotent. Leaves Flower untouched when its engine no longer has a loop with this
    signature (a later Flower may have fixed it, or moved it).
    """
    global _flower_loop
    from flwr.server.superlink.fleet.vce import vce_api

    storing = getattr(vce_api, "put_message_into_state", None)
    if storing is put_message_into_state or (
        storing is not None
        and list(inspect.signature(storing).parameters) == _FLOWER_STORE_PARAMETERS
    ):
        vce_api.put_message_into_state = put_message_into_state
    current = getattr(vce_api, "add_messages_to_queue", None)
    if current is add_messages_to_queue:
        return True
    if current is None or list(inspect.signature(current).parameters) != _FLOWER_LOOP_PARAMETERS:
        _LOG.debug("Flower's simulation engine changed: its own message delivery stays")
        return False
    _flower_loop = current
    vce_api.add_messages_to_queue = add_messages_to_queue
    return True
