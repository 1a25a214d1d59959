"""The console: a live client count during a round on a terminal (nothing of it in a log), and
Flower's round trip with progress keeping Flower's semantics (all replies, or the timeout)."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from privfed.server.progress import Progress, send_and_receive


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
