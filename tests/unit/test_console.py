"""The console: a live client count during a round on a terminal (nothing of it in a log), and
Flower's round trip with progress keeping Flower's semantics (all replies, or the timeout)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from privfed.server.progress import (
    MIN_PULL_S,
    PULL_SHARE,
    Progress,
    next_pull_in,
    send_and_receive,
)


class _FakeGrid:
    """Unit-test fake of Flower's Grid: replies arrive one per pull; ``lost`` never do."""

    pull_interval = 0.0

    def __init__(self, lost: int = 0) -> None:
        self.lost, self.queue = lost, []

    def push_messages(self, messages):
        ids = [f"m{i}" for i, _ in enumerate(messages)]
        self.queue = ids[: len(ids) - self.lost]
        return ids

    def pull_messages(self, ids):
        if not self.queue:
            return []
        mid = self.queue.pop(0)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid))]


def test_replies_are_counted_as_they_arrive():
    seen = []
    replies = send_and_receive(_FakeGrid(), list(range(4)), 5.0, lambda d, s: seen.append((d, s)))
    assert len(replies) == 4
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]


def test_missing_replies_end_at_the_timeout_with_what_came():
    replies = send_and_receive(_FakeGrid(lost=2), list(range(4)), 0.2, lambda d, s: None)
    assert len(replies) == 2


def test_an_in_process_grid_is_asked_again_soon_while_asking_is_cheap():
    assert next_pull_in(0.0, 0.1) == MIN_PULL_S  # cheap: 10 ms, not Flower's 100 ms
    assert next_pull_in(0.004, 0.1) == 0.004 / PULL_SHARE  # at most a tenth of the time
    assert next_pull_in(0.05, 0.1) == 0.1  # never later than the grid's own interval


def test_the_wait_follows_what_each_pull_cost(monkeypatch):
    """Unit test with a fake clock: a pull that costs 3 ms is followed by a 30 ms wait."""
    import privfed.server.progress as progress

    clock = {"t": 0.0}
    waits: list[float] = []

    class _SlowFakeGrid(_FakeGrid):
        pull_interval = 0.1

        def pull_messages(self, ids):
            clock["t"] += 0.003
            return super().pull_messages(ids)

    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(progress.time, "sleep", waits.append)
    assert len(send_and_receive(_SlowFakeGrid(), list(range(3)), 5.0, lambda d, s: None)) == 3
    assert waits == [pytest.approx(0.03)] * 2


def test_with_a_stored_event_the_grid_is_asked_only_once_replies_are_there():
    """Unit test with a fake grid and a fake engine thread (named as such) that stores a reply
    every 0.1 s and sets the event: the server asks about once per stored reply, where on its
    timer (at most every 10 ms) it would ask ~30 times over the same 0.3 s, and gets them all."""
    import threading
    import time

    stored = threading.Event()

    class _StoringFakeGrid(_FakeGrid):
        pull_interval = 0.1

        def __init__(self) -> None:
            super().__init__()
            self.asked, self.ready = 0, []

        def push_messages(self, messages):
            ids = super().push_messages(messages)
            self.queue, self.ready = [], ids
            return ids

        def pull_messages(self, ids):
            self.asked += 1
            return super().pull_messages(ids)

        def store_later(self):  # the fake engine: one reply stored every 0.1 s
            for mid in self.ready:
                time.sleep(0.1)
                self.queue.append(mid)
                stored.set()

    grid = _StoringFakeGrid()
    engine = threading.Thread(target=grid.store_later)

    def on_reply(done, sent):
        if done == 0:
            engine.start()

    replies = send_and_receive(grid, list(range(3)), 5.0, on_reply, stored=stored)
    engine.join(timeout=5)
    assert len(replies) == 3
    assert grid.asked <= 2 * 3 + 1, grid.asked


def test_the_live_count_shows_on_a_terminal_only():
    terminal = io.StringIO()
    progress = Progress(3, 1, console=Console(file=terminal, force_terminal=True, width=120))
    progress.clients_done(1, 2, 10)
    progress._end_status()
    assert "round 1/3: 2/10 clients done" in terminal.getvalue()
    log = io.StringIO()
    quiet = Progress(3, 1, console=Console(file=log, force_terminal=False, width=120))
    quiet.clients_done(1, 2, 10)
    assert log.getvalue() == ""
