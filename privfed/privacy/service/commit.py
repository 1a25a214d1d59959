"""Group commit: durable reports at many per fsync, with the next batch's checks overlapping the
current batch's fsync.

Reports that arrive while a transaction commits wait in a list; when it ends, all of them go
into the next transaction (``Ledger.report_many``), and each is answered only after its COMMIT.
The transaction runs on one writer thread: SQLite releases the GIL while it writes and syncs,
so the event loop meanwhile reads, authenticates, validates and prices the next requests. There
are two thread hand-offs per batch, not per report (a hand-off per report cost more CPU than
the ledger's own work).

Each report is still checked against the budget on its own, in arrival order; an item that
fails is that item's answer. A storage error (``sqlite3.Error``) fails the whole batch: every
report in it gets :class:`StorageError`, and nothing of it is recorded. The last storage error
is kept for /health until a commit succeeds again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from privfed.privacy.events import PrivacyEvent
from privfed.privacy.ledger import EventKey, Ledger


class StorageError(Exception):
    """The ledger could not commit (disk full, read-only, I/O error): retry later."""


_PROBE = object()  # a health probe: commits the heartbeat row with the batch


class GroupCommitter:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._pending: list[tuple[object, asyncio.Future]] = []
        self._busy = False
        self.last_error: tuple[float, str] | None = None  # (when, what) until a commit succeeds
        self.batches = 0

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def submit(self, key: EventKey, event: PrivacyEvent) -> asyncio.Future:
        return self._enqueue((key, event))

    def probe(self) -> asyncio.Future:
        """Resolves when the heartbeat row has been committed (or with StorageError)."""
        return self._enqueue(_PROBE)

    def _enqueue(self, item: object) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending and not self._busy:  # flush after the rest of this loop iteration
            loop.call_soon(self._flush)
        self._pending.append((item, future))
        return future

    def _flush(self) -> None:
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self._writer, self._commit, [item for item, _ in batch])
        done.add_done_callback(lambda outcome: self._answer(batch, outcome))

    def _commit(self, items: list[object]) -> list:
        """On the writer thread: one transaction for the batch."""
        reports = [item for item in items if item is not _PROBE]
        results = iter(self.ledger.report_many(reports, touch=len(reports) < len(items)))  # type: ignore[arg-type]
        return [None if item is _PROBE else next(results) for item in items]

    def _answer(self, batch: list[tuple[object, asyncio.Future]], outcome: asyncio.Future) -> None:
        self._busy = False
        self.batches += 1
        failure = outcome.exception()
        if isinstance(failure, sqlite3.Error):
            self.last_error = (time.time(), f"{type(failure).__name__}: {failure}")
            results: list = [StorageError(f"ledger storage: {failure}")] * len(batch)
        elif failure is not None:  # a bug in the batch path: fail the batch loudly, not silently
            results = [failure] * len(batch)
        else:
            self.last_error = None
            results = outcome.result()
        for (_, future), result in zip(batch, results, strict=True):
            if future.cancelled():  # the client went away; its report stands (or not) as is
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._flush()  # what arrived meanwhile is the next batch
