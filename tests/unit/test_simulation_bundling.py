"""privfed.simulation_bundling's pieces on Flower's real messages and queue; the whole engine
with Ray runs in tests/integration/test_simulation.py (the same releases bundled or not)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from queue import Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api

from privfed import simulation_bundling
from privfed.simulation_bundling import BundledClientApp, _take, bundle_size
from privfed.simulation_delivery import deliver_pending

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from simulation import flower_federation  # noqa: E402

# flower_federation sets the task identity: put back after each test (tests/unit/conftest.py)
pytestmark = pytest.mark.usefixtures("restore_task_identity")


def _delivered(*nodes: int) -> list[Message]:
    """Flower's real messages to nodes 1.., as the engine's queue gets them (pushed by the
    grid, delivered from the link state), one per entry of ``nodes`` (in that order)."""
    state, grid, mapping = flower_federation(max(nodes))
    ids = sorted(mapping, key=mapping.get)  # node id of partition 0, 1, ...
    out = []
    for node in nodes:  # one push and delivery at a time: a node may get two messages
        grid.push_messages([Message(RecordDict(), dst_node_id=ids[node - 1], message_type="train")])
        out += deliver_pending(state, frozenset(mapping))
    return out


def test_a_bundle_is_a_fair_share_of_what_waits_within_the_cap():
    assert bundle_size(1, 2, 8) == 1
    assert bundle_size(4, 2, 8) == 1  # a round's tail: one client a call
    assert bundle_size(9, 2, 8) == 3
    assert bundle_size(100, 2, 8) == 8
    assert bundle_size(100, 2, 1) == 1
    assert bundle_size(6, 0, 8) == 3  # no actors reported: as one


def test_a_bundle_takes_what_waits_and_never_two_messages_of_one_node():
    m1, m2, m3, m2_again, m4, m5 = _delivered(1, 2, 3, 2, 4, 5)
    queue: Queue = Queue()
    for message in (m2, m3, m2_again, m4):
        queue.put(message)
    assert _take(m1, queue, 8) == [m1, m2, m3]
    # node 2's second message goes back for a later call, nothing is lost
    assert {queue.get_nowait().metadata.message_id for _ in range(2)} == {
        m2_again.metadata.message_id,
        m4.metadata.message_id,
    }
    queue.put(m5)
    assert _take(m1, queue, 1) == [m1]
    assert queue.qsize() == 1


class _FakeClientApp:
    """A fake ClientApp (unit test only): replies to each message, raises on the second."""

    def __init__(self, crashing: Message) -> None:
        self.crashing = crashing.metadata.message_id
        self.seen: list[str] = []

    def __call__(self, message: Message, context: object) -> Message:
        self.seen.append(message.metadata.message_id)
        if message.metadata.message_id == self.crashing:
            raise RuntimeError("this client crashed")
        return Message(RecordDict(), reply_to=message)


def test_each_client_in_a_bundle_runs_in_turn_and_its_failure_is_its_own():
    messages = _delivered(1, 2, 3)
    app = _FakeClientApp(messages[1])
    run = BundledClientApp(lambda: app)()  # what the actor does: load, then call
    contexts = ["c1", "c2", "c3"]
    out = run(message=list(zip(messages, contexts, strict=True)), context=None)
    ids = [m.metadata.message_id for m in messages]
    assert app.seen == ids
    assert [ctx for _, ctx in out] == contexts
    replies = [reply for reply, _ in out]
    assert [r.metadata.reply_to_message_id for r in replies] == ids
    assert [r.has_error() for r in replies] == [False, True, False]
    assert "this client crashed" in replies[1].error.reason


def test_install_puts_the_worker_in_place_and_one_message_a_call_puts_flowers_back(monkeypatch):
    flowers = vce_api.worker
    monkeypatch.setattr(vce_api, "worker", flowers)
    assert simulation_bundling.install(8)
    assert vce_api.worker is simulation_bundling.worker
    assert simulation_bundling.install(4)  # idempotent, the cap follows
    assert not simulation_bundling.install(1)
    assert vce_api.worker is flowers


def test_a_changed_flower_worker_is_left_alone(monkeypatch):
    def worker(messageins_queue, messageres_queue, node_info_store, backend, f_stop):
        raise AssertionError("never called here")

    monkeypatch.setattr(vce_api, "worker", worker)
    assert not simulation_bundling.install(8)
    assert vce_api.worker is worker


class _FakeBackend:
    """A fake backend (unit test only) whose actor calls fail: the bundle's every message gets
    an error reply, none is lost."""

    num_workers = 2
    app_fn = None
    pool = None


def test_a_failed_call_answers_every_message_in_it_with_an_error():
    class _Metrics:
        def add_clientapp_runtime(self, seconds: float) -> None:
            pass

    inbox: Queue = Queue()
    outbox: Queue = Queue()
    messages = _delivered(1, 2, 3, 4)
    for message in messages:
        inbox.put(message)
    stop = threading.Event()
    thread = threading.Thread(
        target=simulation_bundling.worker,
        args=(inbox, outbox, {}, _FakeBackend(), stop, _Metrics()),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulation_bundling, "_messages_per_call", 8)
        thread.start()
        replies = [outbox.get(timeout=10) for _ in range(4)]
        stop.set()
        thread.join(timeout=5)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in messages
    )
    assert all(r.has_error() for r in replies)
    assert outbox.empty()


def test_replies_are_aggregated_in_partition_order_whatever_order_they_arrived_in():
    """Bundles change the order replies arrive in; the server's float sums must not follow it
    (strategies/replies.in_partition_order): ordered by the partition each reply names, error
    replies last."""
    from flwr.app import Error, MetricRecord

    from privfed import keys
    from privfed.strategies.replies import in_partition_order

    sent = _delivered(1, 2, 3, 4)

    def reply(msg: Message, partition: int) -> Message:
        metrics = MetricRecord({keys.PARTITION_ID: partition})
        return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)

    failed = Message(Error(code=0, reason="crashed"), reply_to=sent[0])
    arrived = [reply(sent[1], 3), failed, reply(sent[2], 1), reply(sent[3], 2)]
    ordered = in_partition_order(arrived)
    assert ordered[-1] is failed
    assert [m.content.metric_records[keys.METRICS][keys.PARTITION_ID] for m in ordered[:3]] == [
        1,
        2,
        3,
    ]
