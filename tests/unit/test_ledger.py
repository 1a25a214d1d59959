"""The SQLite ledger: idempotent, durable, and never overspends (also under concurrency)."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest

from privfed.privacy.accountant import epsilon
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.ledger import BudgetUnknownError, EventKey, Ledger

from ..helpers import SmallDisk

EV = SampledGaussianEvent(q=0.1, sigma=1.0, steps=10)


def test_report_is_idempotent(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_budget("c", 100.0, 1e-5)
    key = EventKey("run", "c", 1)
    first = ledger.report(key, EV)
    again = ledger.report(key, EV)
    assert first.accepted and not first.duplicate
    assert again.accepted and again.duplicate
    assert again.epsilon_spent == pytest.approx(first.epsilon_spent)
    assert len(ledger.rows()) == 1
    assert ledger.spent("c") == pytest.approx(epsilon([EV], 1e-5))


def test_same_key_with_another_event_is_an_error(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_budget("c", 100.0, 1e-5)
    ledger.report(EventKey("run", "c", 1), EV)
    with pytest.raises(ValueError, match="different event"):
        ledger.report(EventKey("run", "c", 1), SampledGaussianEvent(0.1, 2.0, 10))
    assert len(ledger.rows()) == 1


def test_budget_is_enforced_and_refusal_changes_nothing(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    budget = epsilon([EV, EV], 1e-5) * (1 + 1e-9)  # room for two events, not three
    assert epsilon([EV, EV, EV], 1e-5) > budget
    ledger.set_budget("c", budget, 1e-5)
    answers = [ledger.report(EventKey("run", "c", r), EV) for r in (1, 2, 3)]
    assert [a.accepted for a in answers] == [True, True, False]
    assert len(ledger.rows()) == 2
    assert not ledger.plan("c", EV).accepted
    assert ledger.spent("c") == pytest.approx(epsilon([EV, EV], 1e-5))


def test_unknown_client_has_no_budget(tmp_path):
    with pytest.raises(BudgetUnknownError):
        Ledger(tmp_path / "l.sqlite").plan("nobody", EV)


def test_reports_survive_reopening(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.set_budget("c", 100.0, 1e-5)
    ledger.report(EventKey("run", "c", 1), EV)
    del ledger
    assert Ledger(path).rows()[0][:4] == ("run", "c", 1, "dp_sgd")


def _report_many(path: str, worker: int, rounds: int, queue) -> None:
    ledger = Ledger(path)
    accepted = 0
    for r in range(rounds):
        # Every worker reports distinct keys for the same client: a race for one budget.
        if ledger.report(EventKey(f"w{worker}", "c", r), EV).accepted:
            accepted += 1
    queue.put(accepted)


def test_concurrent_reports_never_overspend(tmp_path):
    path = str(tmp_path / "l.sqlite")
    ledger = Ledger(path)
    one = epsilon([EV], 1e-5)
    budget = epsilon([SampledGaussianEvent(0.1, 1.0, 10 * 7)], 1e-5) * 1.0000001  # exactly 7 fit
    assert epsilon([SampledGaussianEvent(0.1, 1.0, 80)], 1e-5) > budget > one
    ledger.set_budget("c", budget, 1e-5)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_report_many, args=(path, w, 5, queue)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    accepted = sum(queue.get(timeout=5) for _ in procs)
    assert accepted == 7
    assert len(ledger.rows()) == 7
    assert ledger.spent("c") <= budget


def test_two_connections_see_each_others_commits(tmp_path):
    """Each connection caches budgets and RDP curves; a commit by another drops them."""
    path = tmp_path / "l.sqlite"
    first, second = Ledger(path), Ledger(path)
    first.set_budget("c", 100.0, 1e-5)
    recorded = []
    for r in range(12):
        event = SampledGaussianEvent(0.1, 1.0 + r / 10, 10)
        (first if r % 2 else second).report(EventKey("run", "c", r), event)
        recorded.append(event)
        want = epsilon(recorded, 1e-5)
        assert first.spent("c") == pytest.approx(want, rel=1e-12)
        assert second.spent("c") == pytest.approx(want, rel=1e-12)
    second.set_budget("c", first.spent("c") * 1.0001, 1e-5)
    assert not first.plan("c", EV).accepted  # the lowered budget, not a cached one
    assert not first.report(EventKey("run", "c", 99), EV).accepted


def test_threads_of_one_ledger_never_overspend(tmp_path):
    """The service's case: one Ledger object, a connection (and caches) per thread."""
    import threading

    ledger = Ledger(tmp_path / "l.sqlite")
    budget = epsilon([SampledGaussianEvent(0.1, 1.0, 10 * 9)], 1e-5) * 1.0000001  # exactly 9 fit
    ledger.set_budget("c", budget, 1e-5)
    accepted = []

    def worker(w: int) -> None:
        for r in range(6):
            if ledger.report(EventKey(f"w{w}", "c", r), EV).accepted:
                accepted.append((w, r))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(accepted) == 9 == len(ledger.rows())
    assert ledger.spent("c") == pytest.approx(epsilon([EV] * 9, 1e-5), rel=1e-12)


class _FailingEvent(SampledGaussianEvent):
    """Test fake: an event whose serialisation fails inside the batch's transaction."""

    def to_json(self) -> str:
        raise RuntimeError("boom")


def test_an_item_that_raises_fails_alone(tmp_path):
    """Whatever one item raises is its own answer: the items around it are recorded."""
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_budget("c", 100.0, 1e-5)
    batch = [
        (EventKey("run", "c", 0), EV),
        (EventKey("run", "c", 1), _FailingEvent(0.1, 1.0, 10)),
        (EventKey("run", "c", 2), EV),
    ]
    first, failed, third = ledger.report_many(batch)
    assert isinstance(failed, RuntimeError)
    assert first.accepted and third.accepted and third.epsilon_spent > first.epsilon_spent
    assert [r[2] for r in ledger.rows()] == [0, 2]
    assert ledger.spent("c") == pytest.approx(epsilon([EV, EV], 1e-5), rel=1e-12)


def _fill_the_disk(ledger: Ledger) -> None:
    """Cap the database at its current size: the next page it needs fails with SQLITE_FULL,
    SQLite's own "database or disk is full" (what a full disk gives)."""
    with ledger._connect() as con:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count = {pages}")


def test_a_storage_error_aborts_the_batch_and_leaves_no_trace(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    # RDP: this is about storage, and under PLD each of 800 reports is a new composition (~35 ms)
    ledger.set_budget("c", 100.0, 1e-5, method="rdp")
    ledger.report(EventKey("run", "c", 0), EV)
    spent = ledger.spent("c")
    _fill_the_disk(ledger)
    batch = [(EventKey("run", "c", r), EV) for r in range(1, 400)]
    with pytest.raises(sqlite3.OperationalError, match="full"):
        ledger.report_many(batch)
    assert len(ledger.rows()) == 1
    assert ledger.spent("c") == spent  # the caches hold nothing of the aborted batch
    with ledger._connect() as con:  # space returns: it records again
        con.execute("PRAGMA max_page_count = 1073741823")
    assert all(a.accepted for a in ledger.report_many(batch))
    assert len(ledger.rows()) == 400


def test_the_write_probe_fails_on_a_full_disk_and_passes_when_space_returns(tmp_path):
    with SmallDisk(tmp_path / "disk") as disk:
        ledger = Ledger(disk.path / "l.sqlite")
        ledger.set_budget("c", 100.0, 1e-5)
        with ledger._connect() as con:  # an empty WAL: the next commit must grow it
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        disk.fill()
        with pytest.raises(sqlite3.OperationalError, match="full"):
            ledger.check_writable()
        disk.free()
        for _ in range(3):  # the first probes may add a page or two
            ledger.check_writable()

        def size_on_disk() -> int:
            with ledger._connect() as con:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return (disk.path / "l.sqlite").stat().st_size

        size = size_on_disk()
        for _ in range(20):
            ledger.check_writable()
        assert size_on_disk() == size  # probes undo their rows: the file does not grow
        assert ledger.rows() == []
        ledger.close()
