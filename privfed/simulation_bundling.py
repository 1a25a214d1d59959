"""Several client messages per Ray call in Flower's Simulation Engine (cross-device scale).

Flower's engine runs one worker thread per Ray actor (``vce_api.worker``): it takes one message,
submits it to an idle actor (``actor.run.remote``: the ClientApp's loader, the message and the
node's context are pickled for the call), waits for the reply and only then takes the next. At
cross-device scale a client trains on one or two examples, and that round trip (and the actor
idle while the reply travels back and the next message comes) is a large share of what a
client-round costs.

:func:`worker` is a drop-in for Flower's worker that takes up to ``messages_per_call`` waiting
messages at once and sends them in one call to one actor, which runs the same ClientApp on
each, **one after another, exactly as it would have run them as separate calls** (the actor
process and its kept model are the same; client/local_model.py scrubs between clients), and
returns every reply and updated context together. Nothing a client computes changes: each
message's reply, or the error reply Flower would have made of its exception, is what a call of
its own returns. A message's reply leaves the actor with the bundle's, so it is never sent
before the client recorded its release (the client's protocol finishes before it returns). The
bundle's durable writes (each client's release and ledger record) are flushed once, after its
last client and before the replies leave (privacy/durability.py), not once per client.

A bundle is at most half a fair share of what is waiting (the waiting messages over twice the
actors), so that at the end of a round no actor holds several clients while another idles.
:func:`install` puts the worker in place for one run; on a Flower whose worker has another
signature it leaves Flower's own, and says so at debug level.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from math import ceil
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

_LOG = logging.getLogger(__name__)

_FLOWER_WORKER_PARAMETERS = [
    "messageins_queue",
    "messageres_queue",
    "node_info_store",
    "backend",
    "f_stop",
    "metrics",
]
_messages_per_call = 1
_flush_per_call = True
_flower_worker: Callable[..., None] | None = None  # Flower's, kept by install()
_counts_lock = threading.Lock()
_counts = {"messages": 0, "calls": 0}


def counts() -> tuple[int, int]:
    """(client messages, actor calls) since :func:`install`."""
    with _counts_lock:
        return _counts["messages"], _counts["calls"]


def _error_reply(message: Any, ex: Exception, code: int) -> Any:
    """The error reply Flower's worker makes of an exception (the same reason text)."""
    from flwr.app import Error, Message

    return Message(Error(code=code, reason=f"{type(ex)}:<'{ex}'>"), reply_to=message)


class BundledClientApp:
    """What an actor runs for a bundle, in the place of Flower's ClientApp loader: loading it
    gives :class:`_EachInTurn` over the loaded ClientApp."""

    def __init__(self, load_app: Callable[[], Any], flush_per_call: bool = True) -> None:
        self.load_app = load_app
        self.flush_per_call = flush_per_call

    def __call__(self) -> _EachInTurn:
        return _EachInTurn(self.load_app(), self.flush_per_call)


class _EachInTurn:
    """Called as Flower's actor calls a ClientApp (``app(message=..., context=...)``), with a
    list of (message, context): the ClientApp on each in turn; for each, (reply, context), the
    reply being the error reply Flower's worker makes of an exception (so one client's failure
    is its own)."""

    def __init__(self, app: Any, flush_per_call: bool) -> None:
        self.app = app
        self.flush_per_call = flush_per_call

    def __call__(self, message: list, context: Any = None) -> list:
        from flwr.common.constant import ErrorCode

        from privfed.privacy import durability

        out = []
        # The clients' releases and ledger records are flushed once, at the block's end, which
        # is before any of their replies leaves (they leave when this call returns)
        with durability.one_flush() if self.flush_per_call else nullcontext():
            for one, ctx in message:
                try:
                    reply = self.app(message=one, context=ctx)
                except Exception as ex:  # noqa: BLE001 - reported as the client's error reply
                    _LOG.error("a client in a bundle raised: %s\n%s", ex, traceback.format_exc())
                    reply = _error_reply(one, ex, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
                out.append((reply, ctx))
        return out


def bundle_size(waiting: int, actors: int, most: int) -> int:
    """How many messages one call takes when ``waiting`` wait (including the one taken): half a
    fair share over the actors, at least 1, at most ``most``. Bundles shrink as the round's
    queue drains, so its last calls are short and no actor idles long while another finishes
    a full bundle (with a full share each, the round's tail cost one bundle's time)."""
    return max(1, min(most, ceil(waiting / (2 * max(1, actors)))))


def _take(first: Any, queue: Queue, size: int) -> list:
    """``first`` and up to ``size - 1`` more waiting messages, at most one per node (two would
    start from the same stored context, and the second's update would overwrite the first's)."""
    taken, nodes = [first], {first.metadata.dst_node_id}
    while len(taken) < size:
        try:
            message = queue.get_nowait()
        except Empty:
            break
        if message.metadata.dst_node_id in nodes:
            queue.put(message)  # for a later call
            break
        taken.append(message)
        nodes.add(message.metadata.dst_node_id)
    return taken


def _process(backend: Any, messages: list, node_info_store: dict) -> list:
    """Run ``messages`` in one actor call; store each updated context; their replies."""
    from flwr.common.constant import PARTITION_ID_KEY

    contexts = []
    for message in messages:
        node_id = message.metadata.dst_node_id
        contexts.append(node_info_store[node_id].retrieve_context(message.metadata.run_id))
    app_fn = backend.app_fn
    pool = backend.pool
    if pool is None or app_fn is None:
        raise ValueError("the backend is not built: no actor pool or ClientApp loader")
    cid = ",".join(str(c.node_config[PARTITION_ID_KEY]) for c in contexts)
    future = pool.submit(
        lambda actor, a_fn, bundle, c, _: actor.run.remote(a_fn, bundle, c, None),
        (
            BundledClientApp(app_fn, _flush_per_call),
            list(zip(messages, contexts, strict=True)),
            cid,
            None,
        ),
    )
    try:
        results = pool.fetch_result_and_return_actor_to_pool(future)[0]
    except BaseException:
        pool.add_actor_back_to_pool(future)
        raise
    replies = []
    for message, (reply, context) in zip(messages, results, strict=True):
        node_info_store[message.metadata.dst_node_id].update_context(
            message.metadata.run_id, context=context
        )
        replies.append(reply)
    return replies


def worker(
    messageins_queue: Queue,
    messageres_queue: Queue,
    node_info_store: dict,
    backend: Any,
    f_stop: threading.Event,
    metrics: Any,
) -> None:
    """Drop-in for Flower's ``vce_api.worker`` (same arguments): bundles of waiting messages,
    one actor call each; every message gets its reply, or an error reply if the call failed."""
    from flwr.common.constant import ErrorCode

    while not f_stop.is_set():
        try:
            first = messageins_queue.get(timeout=1.0)
        except Empty:
            continue
        size = bundle_size(
            messageins_queue.qsize() + 1, backend.num_workers, max(1, _messages_per_call)
        )
        messages = _take(first, messageins_queue, size)
        with _counts_lock:
            _counts["messages"] += len(messages)
            _counts["calls"] += 1
        started = time.perf_counter()
        try:
            replies = _process(backend, messages, node_info_store)
        except Exception as ex:  # noqa: BLE001 - as Flower's worker: every message an error
            _LOG.error("a bundle of %d client calls failed: %s", len(messages), ex)
            _LOG.error(traceback.format_exc())
            replies = [_error_reply(m, ex, ErrorCode.UNKNOWN) for m in messages]
        elapsed = time.perf_counter() - started
        for _ in messages:
            metrics.add_clientapp_runtime(elapsed / len(messages))
        for reply in replies:
            reply.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's worker does
            messageres_queue.put(reply)


def install(messages_per_call: int, flush_per_call: bool = True) -> bool:
    """Use :func:`worker`, with bundles of at most ``messages_per_call``, in Flower's simulation
    engine; True if it is in use. ``messages_per_call=1`` puts Flower's own worker back.
    ``flush_per_call``: a bundle's durable writes flushed once, after its last client (else
    each as it is made)."""
    global _flower_worker, _messages_per_call, _flush_per_call
    from flwr.server.superlink.fleet.vce import vce_api

    with _counts_lock:
        _counts.update(messages=0, calls=0)

    current = getattr(vce_api, "worker", None)
    if current is not worker:
        if current is None or list(inspect.signature(current).parameters) != (
            _FLOWER_WORKER_PARAMETERS
        ):
            _LOG.debug("Flower's simulation engine changed: its own worker stays")
            return False
        _flower_worker = current
    _messages_per_call = messages_per_call
    _flush_per_call = flush_per_call
    if messages_per_call <= 1:
        if _flower_worker is not None:
            vce_api.worker = _flower_worker
        return False
    vce_api.worker = worker
    return True
