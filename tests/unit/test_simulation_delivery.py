"""privfed.simulation_delivery against Flower's own per-node delivery, on Flower's real in-memory
link state, grid and messages (what ``run_simulation`` builds), not on a stand-in."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from queue import Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api

from privfed import simulation_delivery
from privfed.server import progress
from privfed.simulation_delivery import deliver_pending, supports_one_pass

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from simulation import flower_federation  # noqa: E402

# flower_federation sets the task identity: put back after each test (tests/unit/conftest.py)
pytestmark = pytest.mark.usefixtures("restore_task_identity")


class Federation:
    """A run with ``num_nodes`` registered nodes, set up the way Flower's run_simulation does
    (bench/simulation.py's ``flower_federation``, which the delivery benchmark times)."""

    def __init__(self, num_nodes: int) -> None:
        self.state, self.grid, self.nodes = flower_federation(num_nodes)

    def push(self, node_ids, ttl: float | None = None) -> list[str]:
        messages = [
            Message(RecordDict(), dst_node_id=node, message_type="train", ttl=ttl)
            for node in node_ids
        ]
        return list(self.grid.push_messages(messages))


def test_the_state_run_simulation_builds_has_what_one_pass_needs():
    assert supports_one_pass(Federation(3).state)
    assert not supports_one_pass(object())


def test_one_sweep_delivers_what_flowers_per_node_calls_deliver_and_each_message_once():
    fed = Federation(40)
    nodes = list(fed.nodes)
    pushed = fed.push(nodes[:25])
    delivered = deliver_pending(fed.state, frozenset(fed.nodes))
    assert sorted(m.metadata.message_id for m in delivered) == sorted(pushed)
    assert all(m.metadata.delivered_at for m in delivered)
    # delivered means delivered to Flower too: its own per-node call finds nothing left
    assert all(fed.state.get_message_ins(node_id=n, limit=1) == [] for n in nodes)
    assert deliver_pending(fed.state, frozenset(fed.nodes)) == []
    # and what comes later is delivered on the next sweep
    later = fed.push(nodes[25:27])
    assert sorted(m.metadata.message_id for m in deliver_pending(fed.state, fed.nodes)) == sorted(
        later
    )


def test_messages_for_other_nodes_stay_for_them():
    fed = Federation(10)
    nodes = list(fed.nodes)
    fed.push(nodes)
    mine = frozenset(nodes[:4])
    assert {m.metadata.dst_node_id for m in deliver_pending(fed.state, mine)} == set(mine)
    rest = [m for n in nodes[4:] for m in fed.state.get_message_ins(node_id=n, limit=1)]
    assert {m.metadata.dst_node_id for m in rest} == set(nodes[4:])


def test_a_node_gets_one_message_per_sweep_the_oldest_first_as_with_flowers_limit_of_one():
    fed = Federation(3)
    node = next(iter(fed.nodes))
    first, second = fed.push([node]), fed.push([node])
    assert [m.metadata.message_id for m in deliver_pending(fed.state, fed.nodes)] == first
    assert [m.metadata.message_id for m in deliver_pending(fed.state, fed.nodes)] == second
    assert deliver_pending(fed.state, fed.nodes) == []


def test_an_expired_message_is_dropped_as_flower_drops_it():
    fed = Federation(4)
    nodes = list(fed.nodes)
    expired = fed.push(nodes[:1], ttl=0.05)
    alive = fed.push(nodes[1:2])
    time.sleep(0.1)
    assert [m.metadata.message_id for m in deliver_pending(fed.state, fed.nodes)] == alive
    assert expired[0] not in fed.state.message_ins_store


def test_a_reply_to_a_delivered_message_reaches_the_server_app():
    fed = Federation(5)
    node = next(iter(fed.nodes))
    (sent,) = fed.push([node])
    (msg,) = deliver_pending(fed.state, fed.nodes)
    reply = Message(RecordDict(), reply_to=msg)
    reply.metadata.__dict__["_message_id"] = "reply-1"
    assert fed.state.store_message_res(reply) is not None
    assert [m.metadata.reply_to_message_id for m in fed.grid.pull_messages([sent])] == [sent]


def test_the_installed_loop_feeds_the_queue_and_stops(monkeypatch):
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setattr(vce_api, "put_message_into_state", vce_api.put_message_into_state)
    monkeypatch.setattr(progress, "_reply_stored", None)
    assert simulation_delivery.install()
    assert vce_api.add_messages_to_queue is simulation_delivery.add_messages_to_queue
    assert simulation_delivery.install()  # idempotent
    fed = Federation(30)
    queue: Queue = Queue()
    stop = threading.Event()
    loop = threading.Thread(
        target=vce_api.add_messages_to_queue, args=(fed.state, queue, fed.nodes, stop)
    )
    loop.start()
    try:
        pushed = fed.push(list(fed.nodes))
        got = [queue.get(timeout=5).metadata.message_id for _ in pushed]
        assert sorted(got) == sorted(pushed)
        time.sleep(3 * simulation_delivery.SWEEP_INTERVAL_S)
        assert queue.empty()  # nothing twice
    finally:
        stop.set()
        loop.join(timeout=5)
    assert not loop.is_alive()


def test_a_stored_reply_reaches_the_server_app_and_tells_it_so(monkeypatch):
    """The installed storing loop stores a worker's reply in Flower's real link state, where
    the grid finds it, and sets the event the server waits on (cleared before each ask)."""
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setattr(vce_api, "put_message_into_state", vce_api.put_message_into_state)
    monkeypatch.setattr(progress, "_reply_stored", None)
    assert simulation_delivery.install()
    assert vce_api.put_message_into_state is simulation_delivery.put_message_into_state
    assert progress.stored_replies() is None  # no engine storing yet: the server's timer
    fed = Federation(5)
    (sent,) = fed.push([next(iter(fed.nodes))])
    (msg,) = deliver_pending(fed.state, fed.nodes)
    reply = Message(RecordDict(), reply_to=msg)
    reply.metadata.__dict__["_message_id"] = "reply-1"
    queue: Queue = Queue()
    stop = threading.Event()
    loop = threading.Thread(target=vce_api.put_message_into_state, args=(fed.state, queue, stop))
    loop.start()
    try:
        deadline = time.monotonic() + 5
        while progress.stored_replies() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        stored = progress.stored_replies()
        assert stored is not None  # the storing loop announced its event
        stored.clear()
        queue.put(reply)
        assert stored.wait(timeout=5)
        assert [m.metadata.reply_to_message_id for m in fed.grid.pull_messages([sent])] == [sent]
    finally:
        stop.set()
        loop.join(timeout=5)
    assert not loop.is_alive()


def test_a_changed_flower_loop_is_left_alone(monkeypatch):
    def add_messages_to_queue(state, queue, nodes_mapping, f_stop, batch):  # a new signature
        raise AssertionError("never called here")

    monkeypatch.setattr(vce_api, "add_messages_to_queue", add_messages_to_queue)
    monkeypatch.setattr(vce_api, "put_message_into_state", vce_api.put_message_into_state)
    monkeypatch.setattr(progress, "_reply_stored", None)
    assert not simulation_delivery.install()
    assert vce_api.add_messages_to_queue is add_messages_to_queue


@pytest.mark.parametrize("num_nodes", [1000])
def test_one_sweep_checks_each_waiting_message_once_not_once_per_node(num_nodes, monkeypatch):
    """The reason for the module: Flower's sweep runs its validity check nodes x messages
    times; one pass runs it for the waiting messages only (counted, not timed)."""
    fed = Federation(num_nodes)
    fed.push(list(fed.nodes)[:100])
    checked: list[int] = []
    original = type(fed.state)._check_stored_messages

    def counting(self, message_ids, run_id=None):
        checked.append(len(message_ids))
        return original(self, message_ids, run_id)

    monkeypatch.setattr(type(fed.state), "_check_stored_messages", counting)
    assert len(deliver_pending(fed.state, fed.nodes)) == 100
    assert sum(checked) == 100
    checked.clear()
    for node in fed.nodes:  # Flower's sweep, over the same (now delivered) messages
        fed.state.get_message_ins(node_id=node, limit=1)
    assert sum(checked) == num_nodes * 100
