"""The privacy ledger: per-client budgets and privacy events in SQLite.

The embedded accountant backend (this module) and the HTTP accountant service share this schema.
Guarantees:

* durable before the caller proceeds: WAL journal with ``synchronous=FULL``; :meth:`report`
  returns only after the COMMIT (inside ``durability.one_flush()``, a bundle of clients in one
  actor call: durable at the block's end, before any of the bundle's replies leaves);
* idempotent: the key (run, client, round, event name) is the primary key; a repeated report
  changes nothing and returns the first answer, stored with the event (the same floats, also
  after a restart, where a new computation could give another valid bound), with
  ``duplicate`` true;
* no overspending: check-and-record runs inside one ``BEGIN IMMEDIATE`` transaction (one writer
  at a time across processes), so concurrent reports for one client cannot both pass the check;
* epsilon is always derived from the stored events, never stored as the truth, by the client's
  accountant method (``budgets.method``: "pld", the default, or "rdp"; privacy/accountant.py),
  and every answer says which bound decided. Each distinct event's RDP curve (a pure function
  of the event) is kept beside it, keyed by the event and the order set, so that a restarted
  service composes 10,000 events in milliseconds instead of recomputing every curve; a PLD
  epsilon is cached per composition in memory (privacy/pld.py);
* one bad item never fails a batch: anything that goes wrong while checking one report is that
  report's answer; only a storage error (``sqlite3.Error``: disk full, read-only, I/O) fails the
  transaction, and then nothing of it is recorded.

Re-running a round after a resume reuses the round's key. That is sound only because the
client then re-sends its stored release of that round instead of a new one (releases.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from privfed.privacy import curves, durability, pld
from privfed.privacy.accountant import (
    DEFAULT_METHOD,
    Method,
    Spent,
    accountant,
    bound,
    check_method,
    check_supported,
    epsilon_from_rdp,
)
from privfed.privacy.events import ORDERS, PrivacyEvent, event_from_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    client_id TEXT PRIMARY KEY,
    epsilon   REAL NOT NULL,
    delta     REAL NOT NULL,
    method    TEXT NOT NULL DEFAULT 'pld',
    stored_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    run_id     TEXT NOT NULL,
    client_id  TEXT NOT NULL,
    round      INTEGER NOT NULL,
    name       TEXT NOT NULL,
    event      TEXT NOT NULL,
    created_at REAL NOT NULL,
    answer     TEXT,
    PRIMARY KEY (run_id, client_id, round, name)
);
CREATE INDEX IF NOT EXISTS events_by_client ON events (client_id);
CREATE TABLE IF NOT EXISTS curves (
    event     TEXT NOT NULL,
    orders_id TEXT NOT NULL,
    rdp       BLOB NOT NULL,
    PRIMARY KEY (event, orders_id)
);
CREATE TABLE IF NOT EXISTS heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL
);
"""


def _why(path: Path, err: sqlite3.Error) -> str:
    """SQLite's reason, made specific where it is vague ("unable to open database file")."""
    if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
        return f"it is on a read-only filesystem ({err})"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"no permission to read and write it ({err})"
    if "not a database" in str(err):
        return f"it is not a SQLite ledger ({err})"
    return str(err)


def _add_column(con: sqlite3.Connection, table: str, column: str) -> bool:
    """Add ``column`` unless the table has it; True if this call added it."""
    if column.split()[0] in [row[1] for row in con.execute(f"PRAGMA table_info({table})")]:
        return False
    try:
        con.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    except sqlite3.OperationalError as err:  # another process added it first
        if "duplicate column" not in str(err):
            raise
        return False
    return True


@dataclass(frozen=True)
class EventKey:
    """Idempotency key of one report."""

    run_id: str
    client_id: str
    round: int
    name: str = "dp_sgd"


@dataclass(frozen=True)
class Answer:
    """The ledger's answer to a plan or a report."""

    accepted: bool  # fits the budget (plan) / recorded or already present (report)
    duplicate: bool  # the key was already recorded: nothing changed
    epsilon_spent: float  # after the report (or now, for a refused one / a plan: before)
    epsilon_after: float  # what the client would have spent with this event
    epsilon_budget: float
    delta: float
    method: Method  # the bound that gave epsilon_after ("pld" or "rdp")

    def stored(self) -> str:
        """What the ledger keeps beside a recorded event: every field but ``duplicate``."""
        fields = {k: v for k, v in self.__dict__.items() if k != "duplicate"}
        return json.dumps(fields, allow_nan=True)  # floats round-trip exactly; inf as Infinity

    @classmethod
    def repeated(cls, stored: str) -> Answer:
        """The first answer, returned to a repeat of its report."""
        return cls(duplicate=True, **json.loads(stored))


@lru_cache(maxsize=4096)
def _parsed(event_json: str) -> PrivacyEvent:
    return event_from_json(event_json)


@dataclass(frozen=True)
class Totals:
    """A client's events, composed: the RDP curve, and the PLD composition (None where an event
    has no PLD)."""

    rdp: np.ndarray
    composition: pld.Composition | None

    def plus(self, event_json: str) -> Totals:
        one = pld.composition_of([(_parsed(event_json), 1)])
        both = None if self.composition is None or one is None else self.composition.plus(one)
        return Totals(self.rdp + curves.CURVES.curve(event_json), both)

    def spent(self, delta: float, method: Method, compute: bool = True) -> Spent:
        return bound(self.rdp, self.composition, delta, method, compute)


class BudgetUnknownError(KeyError):
    """The client has no budget registered in this ledger."""


class KeyConflictError(ValueError):
    """A report repeats a recorded key with a different event."""


class StorageQuotaError(ValueError):
    """Recording the report would take the client past the bytes it may store."""


class Ledger:
    """SQLite-backed per-client privacy ledger (safe across processes on one machine).

    ``computes_pld``: whether the ledger may compute a PLD epsilon that is not cached, in a
    report's transaction, a plan or a status (embedded use: yes). The accountant service says
    no: its pricer computes them in a worker process first, and where the pricer could not (its
    queue full, its wait spent, the client's quota spent), RDP decides, a valid bound, rather
    than a computation of up to a second holding the event loop or every other client's commit.
    """

    computes_pld = True
    # What one client may store (its events, their answers, the curves it added first), in
    # bytes; None: no limit (embedded use). The accountant service sets it (a client must not
    # fill the disk that every client's reports need).
    max_client_bytes: int | None = None

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Each client's totals after this process's last committed report of it, for
        # pld_needed's forecast only (a hint: another process's commit makes it stale, and then
        # a report's PLD is not ready and RDP decides it; it never decides anything itself).
        self._committed: OrderedDict[str, Totals] = OrderedDict()  # an LRU, see _remember
        self._committed_lock = threading.Lock()
        if self.path.is_dir():
            raise ValueError(f"ledger: {self.path} is a directory, not a SQLite file")
        try:
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
                # Columns added since the first ledgers (a row of an older ledger has its default)
                _add_column(con, "budgets", "method TEXT NOT NULL DEFAULT 'pld'")
                _add_column(con, "events", "answer TEXT")
                if _add_column(con, "budgets", "stored_bytes INTEGER NOT NULL DEFAULT 0"):
                    con.execute(  # what each client has stored so far counts
                        "UPDATE budgets SET stored_bytes = (SELECT COALESCE(SUM(LENGTH(event)), 0)"
                        " FROM events WHERE events.client_id = budgets.client_id)"
                    )
        except sqlite3.DatabaseError as err:  # "file is not a database", unreadable, ...
            self.close()
            raise ValueError(f"ledger: cannot open {self.path}: {_why(self.path, err)}") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, kept open: opening one per call, and the WAL checkpoint
        SQLite runs when the last connection closes, cost more than a report itself. A forked
        child (Ray workers) opens its own; SQLite connections must not cross a fork.

        Each connection caches budgets and composed RDP curves per client. ``PRAGMA
        data_version`` changes when any other connection commits, which drops the caches (it is
        read at the start of each call, and again once a write transaction holds the lock,
        after which no one else can commit); this connection's own writes update them."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            local.con.execute("PRAGMA synchronous=FULL")
            local.deferred = False  # synchronous=FULL: each COMMIT flushed (see _write_txn)
            local.con.execute("PRAGMA busy_timeout=60000")
            local.pid = os.getpid()
            local.curves, local.budgets, local.version = {}, {}, None
            local.stored = set()  # events whose curve this connection saw stored
        self._refresh_caches(local.con)
        yield local.con

    def _refresh_caches(self, con: sqlite3.Connection) -> None:
        """Drop this connection's caches if another connection has committed since."""
        local = self._local
        version = con.execute("PRAGMA data_version").fetchone()[0]
        if version != local.version:
            local.curves.clear()
            local.budgets.clear()
            local.version = version

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's state is freed)."""
        con = getattr(self._local, "con", None)
        if con is not None and getattr(self._local, "pid", None) == os.getpid():
            con.close()
        self._local = threading.local()

    @contextmanager
    def _write_txn(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            deferred = durability.deferred()
            if deferred != self._local.deferred:
                # Inside durability.one_flush() the COMMIT is not flushed on its own: the block's
                # end flushes the WAL (with the bundle's other writes) before any reply leaves
                con.execute(f"PRAGMA synchronous={'NORMAL' if deferred else 'FULL'}")
                self._local.deferred = deferred
            con.execute("BEGIN IMMEDIATE")
            try:
                self._refresh_caches(con)  # commits between the call and the lock
                yield con
                con.execute("COMMIT")
                if deferred:  # the WAL holds the COMMIT (the file too, were WAL mode refused)
                    durability.written(f"{self.path}-wal")
                    durability.written(self.path)
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                self._local.curves.clear()  # they may hold writes that were not committed
                self._local.stored.clear()
                self._local.budgets.clear()
                raise

    # -- budgets -------------------------------------------------------------------------------
    def set_budget(
        self, client_id: str, epsilon: float, delta: float, method: str = DEFAULT_METHOD
    ) -> None:
        """Register (or change) a client's lifetime budget and the accountant that measures it.
        Changing the method re-measures the same events: both methods give valid bounds."""
        check_method(method)
        with self._write_txn() as con:
            con.execute(
                "INSERT INTO budgets (client_id, epsilon, delta, method) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(client_id) DO UPDATE SET epsilon=excluded.epsilon, "
                "delta=excluded.delta, method=excluded.method",
                (client_id, float(epsilon), float(delta), method),
            )
            self._local.budgets.pop(client_id, None)

    def budget(self, client_id: str) -> tuple[float, float]:
        with self._connect() as con:
            return self._budget(con, client_id)[:2]

    def method(self, client_id: str) -> Method:
        with self._connect() as con:
            return self._budget(con, client_id)[2]

    def _budget(self, con: sqlite3.Connection, client_id: str) -> tuple[float, float, Method]:
        cached = self._local.budgets.get(client_id)
        if cached is not None:
            return cached
        row = con.execute(
            "SELECT epsilon, delta, method FROM budgets WHERE client_id = ?", (client_id,)
        ).fetchone()
        if row is None:
            raise BudgetUnknownError(f"no privacy budget registered for client {client_id!r}")
        self._local.budgets[client_id] = (float(row[0]), float(row[1]), check_method(row[2]))
        return self._local.budgets[client_id]

    # -- events --------------------------------------------------------------------------------
    @staticmethod
    def _events(con: sqlite3.Connection, client_id: str) -> list[PrivacyEvent]:
        rows = con.execute(
            "SELECT event FROM events WHERE client_id = ? ORDER BY run_id, round, name",
            (client_id,),
        ).fetchall()
        return [event_from_json(r[0]) for r in rows]

    def events(self, client_id: str) -> list[PrivacyEvent]:
        with self._connect() as con:
            return self._events(con, client_id)

    def check_writable(self) -> None:
        """Commit a write as a report would: raises ``sqlite3.Error`` when the ledger cannot
        record anything (read-only file or directory, disk full, I/O errors)."""
        with self._write_txn() as con:
            self._touch(con)

    @staticmethod
    def _touch(con: sqlite3.Connection) -> None:
        """Do what a report does, then undo it: an event row and its curve are inserted inside a
        savepoint and rolled back (they need the same room a report needs at this moment), and
        the heartbeat row is committed (a WAL append and fsync, as a report's)."""
        con.execute("SAVEPOINT probe")
        try:
            con.execute(
                "INSERT INTO events (run_id, client_id, round, name, event, created_at) "
                "VALUES ('', '', -1, 'health-probe', zeroblob(256), 0)"
            )
            con.execute(
                "INSERT INTO curves (event, orders_id, rdp) VALUES (zeroblob(256), '', ?)",
                (bytes(8 * len(ORDERS)),),
            )
        finally:
            con.execute("ROLLBACK TO probe")
            con.execute("RELEASE probe")
        con.execute("INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?)", (time.time(),))

    def stored_curve(self, event_json: str) -> np.ndarray | None:
        """The curve stored beside an earlier report of this very event, if any."""
        with self._connect() as con:
            row = con.execute(
                "SELECT rdp FROM curves WHERE event = ? AND orders_id = ?",
                (event_json, curves.ORDERS_ID),
            ).fetchone()
        curve = None if row is None else np.frombuffer(row[0], dtype=np.float64)
        return curve if curve is not None and curve.shape == (len(ORDERS),) else None

    @staticmethod
    def _totals(con: sqlite3.Connection, client_id: str) -> Totals:
        """The client's composed RDP curve and PLD composition: identical events are counted
        once and multiplied, and each distinct event's curve comes from memory, else from the
        curves table, so 10,000 events cost milliseconds even after a restart."""
        rows = con.execute(
            "SELECT g.event, g.n, c.rdp FROM (SELECT event, COUNT(*) AS n FROM events "
            "WHERE client_id = ? GROUP BY event) AS g LEFT JOIN curves AS c "
            "ON c.event = g.event AND c.orders_id = ?",
            (client_id, curves.ORDERS_ID),
        ).fetchall()
        total = np.zeros(len(ORDERS))
        for text, count, blob in rows:
            curve = curves.CURVES.get(text)
            if curve is None:
                stored = None if blob is None else np.frombuffer(blob, dtype=np.float64)
                if stored is not None and stored.shape == (len(ORDERS),):
                    curve = curves.CURVES.put(text, stored)
                else:  # a ledger written before curves were stored (or over other orders)
                    curve = curves.CURVES.curve(text)
            total += count * curve
        composition = pld.composition_of((_parsed(text), count) for text, count, _ in rows)
        return Totals(total, composition)

    def _client_totals(self, con: sqlite3.Connection, client_id: str) -> Totals:
        """:meth:`_totals`, cached per connection (see :meth:`_connect`)."""
        totals = self._local.curves.get(client_id)
        if totals is None:
            totals = self._local.curves[client_id] = self._totals(con, client_id)
        return totals

    def _answer(
        self, con: sqlite3.Connection, client_id: str, event_json: str | None, duplicate: bool
    ) -> Answer:
        budget, delta, method = self._budget(con, client_id)
        now = self._client_totals(con, client_id)
        spent = now.spent(delta, method, self.computes_pld)
        after = (
            spent
            if event_json is None
            else now.plus(event_json).spent(delta, method, self.computes_pld)
        )
        return Answer(
            accepted=after.epsilon <= budget,
            duplicate=duplicate,
            epsilon_spent=spent.epsilon,
            epsilon_after=after.epsilon,
            epsilon_budget=budget,
            delta=delta,
            method=after.method,
        )

    def pld_needed(
        self,
        client_id: str,
        event: PrivacyEvent | None,
        times: int = 1,
        before: Sequence[str] = (),
    ) -> tuple[pld.Composition, float] | None:
        """The (composition, delta) whose PLD epsilon the client's answer would need, if it is
        not cached yet; else None: after ``before`` (events, as JSON, of the client's reports
        on their way to the commit) and ``times`` reports of ``event`` (None: the client's
        epsilon now). The accountant service computes it in a pricing worker first, so that
        neither the event loop nor the commit ever does. ``times=2``: after this report and one
        more of the same event (a run's next round reports the same event, so the service
        computes that one ahead)."""
        with self._connect() as con:
            try:
                _, delta, method = self._budget(con, client_id)
            except BudgetUnknownError:
                return None  # the answer will say so
            if not accountant(method).uses_pld:
                return None
            if event is not None and pld.composition_of([(event, 1)]) is None:
                return None
            # Another connection's commit drops this connection's caches after every report,
            # and re-reading the client's events costs O(events): use the committed totals.
            with self._committed_lock:
                after = self._committed.get(client_id)
            if after is None:
                after = self._client_totals(con, client_id)
            for text in before:
                after = after.plus(text)
            if event is not None:
                text = event.to_json()
                for _ in range(times):
                    after = after.plus(text)
        if after.composition is None or after.composition.is_empty():
            return None
        if not epsilon_from_rdp(after.rdp, delta)[0] <= pld.MAX_EPSILON:  # bound() uses RDP
            return None
        if pld.EPSILONS.get(after.composition, delta) is not None:
            return None
        return after.composition, delta

    def plan(self, client_id: str, event: PrivacyEvent) -> Answer:
        """Would ``event`` fit the client's remaining budget? Changes nothing."""
        with self._connect() as con:
            check_supported(event, self._budget(con, client_id)[2])
            return self._answer(con, client_id, event.to_json(), duplicate=False)

    def report(self, key: EventKey, event: PrivacyEvent) -> Answer:
        """Record ``event`` atomically if it fits the budget; idempotent on ``key``."""
        (result,) = self.report_many([(key, event)])
        if isinstance(result, Exception):
            raise result
        return result

    def report_many(
        self, items: list[tuple[EventKey, PrivacyEvent]], touch: bool = False
    ) -> list[Answer | Exception]:
        """Several reports in one transaction (group commit: one fsync for all), each checked
        against the budget as if alone and in order (later items see earlier ones). An item
        that fails (a repeated key with a different event, an unknown client, an event that
        cannot be priced) gets its exception in the list and changes nothing; the others are
        recorded. A storage error (``sqlite3.Error``) fails them all: it is raised, and nothing
        is recorded. ``touch`` also rewrites the heartbeat row (a health probe rides along)."""
        results: list[Answer | Exception] = []
        with self._write_txn() as con:
            for key, event in items:
                con.execute("SAVEPOINT item")
                try:
                    results.append(self._report(con, key, event))
                    con.execute("RELEASE item")
                except sqlite3.Error:
                    raise  # the transaction rolls back: storage, not this item
                except Exception as err:  # noqa: BLE001 (this item's answer, whatever it is)
                    con.execute("ROLLBACK TO item")
                    con.execute("RELEASE item")
                    self._local.curves.pop(key.client_id, None)
                    with self._committed_lock:
                        self._committed.pop(key.client_id, None)
                    self._local.stored.clear()
                    results.append(err)
            if touch:
                self._touch(con)
        for key, _ in items:  # committed: the forecast may use these totals now
            totals = self._local.curves.get(key.client_id)
            if totals is not None:
                self._remember(key.client_id, totals)
        return results

    COMMITTED_CLIENTS = 16384  # ~1.4 kB each; a client not among them is read by SQL

    def _remember(self, client_id: str, totals: Totals) -> None:
        with self._committed_lock:
            self._committed[client_id] = totals
            self._committed.move_to_end(client_id)
            while len(self._committed) > self.COMMITTED_CLIENTS:
                self._committed.popitem(last=False)

    def _report(self, con: sqlite3.Connection, key: EventKey, event: PrivacyEvent) -> Answer:
        text = event.to_json()
        existing = con.execute(
            "SELECT event, answer FROM events "
            "WHERE run_id=? AND client_id=? AND round=? AND name=?",
            (key.run_id, key.client_id, key.round, key.name),
        ).fetchone()
        if existing is not None:
            # the same event, also where an older release wrote a number differently (2 / 2.0)
            if existing[0] != text and _parsed(existing[0]) != event:
                raise KeyConflictError(
                    f"report {key} repeats a recorded key with a different event"
                )
            if existing[1] is not None:
                return Answer.repeated(existing[1])
            # recorded by a ledger from before answers were stored: the client's state now
            return self._answer(con, key.client_id, None, duplicate=True)
        budget, delta, method = self._budget(con, key.client_id)
        check_supported(event, method)
        now = self._client_totals(con, key.client_id)
        totals_after = now.plus(text)
        after = totals_after.spent(delta, method, self.computes_pld)
        if after.epsilon > budget:
            spent = now.spent(delta, method, self.computes_pld).epsilon
            return Answer(False, False, spent, after.epsilon, budget, delta, after.method)
        answer = Answer(True, False, after.epsilon, after.epsilon, budget, delta, after.method)
        stored = answer.stored()
        size = len(key.run_id) + len(key.name) + len(text) + len(stored)
        con.execute(
            "INSERT INTO events (run_id, client_id, round, name, event, created_at, answer) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key.run_id, key.client_id, key.round, key.name, text, time.time(), stored),
        )
        if text not in self._local.stored:  # one INSERT per distinct event and connection
            blob = curves.CURVES.curve(text).tobytes()
            added = con.execute(
                "INSERT OR IGNORE INTO curves (event, orders_id, rdp) VALUES (?, ?, ?)",
                (text, curves.ORDERS_ID, blob),
            ).rowcount
            size += added * (len(text) + len(blob))  # a new curve is its first reporter's
            self._local.stored.add(text)
        self._charge_bytes(con, key.client_id, size)
        self._local.curves[key.client_id] = totals_after  # the item's last step
        return answer

    def _charge_bytes(self, con: sqlite3.Connection, client_id: str, size: int) -> None:
        """Count what the client stores, inside the report's savepoint: past
        ``max_client_bytes`` the item is rolled back (StorageQuotaError), never written."""
        (used,) = con.execute(
            "UPDATE budgets SET stored_bytes = stored_bytes + ? WHERE client_id = ? "
            "RETURNING stored_bytes",
            (size, client_id),
        ).fetchone()
        if self.max_client_bytes is not None and used > self.max_client_bytes:
            raise StorageQuotaError(
                f"client {client_id!r} may store {self.max_client_bytes} bytes "
                f"(--max-client-bytes); this report would take it to {used}"
            )

    def stored_bytes(self, client_id: str) -> int:
        """The bytes the client has stored (its quota's count)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT stored_bytes FROM budgets WHERE client_id = ?", (client_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def has(self, key: EventKey) -> bool:
        """Is ``key`` already recorded?"""
        with self._connect() as con:
            row = con.execute(
                "SELECT 1 FROM events WHERE run_id=? AND client_id=? AND round=? AND name=?",
                (key.run_id, key.client_id, key.round, key.name),
            ).fetchone()
        return row is not None

    def spent(self, client_id: str) -> float:
        return self.spent_by(client_id).epsilon

    def spent_by(self, client_id: str) -> Spent:
        """The client's epsilon so far and the bound that gave it."""
        with self._connect() as con:
            answer = self._answer(con, client_id, None, duplicate=False)
        return Spent(answer.epsilon_spent, answer.method)

    def count(self, client_id: str) -> int:
        with self._connect() as con:
            row = con.execute("SELECT COUNT(*) FROM events WHERE client_id = ?", (client_id,))
            return int(row.fetchone()[0])

    def keyed_events(self, client_id: str) -> list[tuple[str, int, str, str]]:
        """(run, round, name, event JSON) of every event of the client."""
        with self._connect() as con:
            return list(
                con.execute(
                    "SELECT run_id, round, name, event FROM events WHERE client_id = ? "
                    "ORDER BY run_id, round, name",
                    (client_id,),
                )
            )

    def clients(self) -> list[str]:
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT client_id FROM budgets ORDER BY client_id")]

    def rows(self) -> list[tuple[str, str, int, str, str]]:
        """All event rows (run, client, round, name, event JSON), for checkpoints and audits."""
        with self._connect() as con:
            return list(
                con.execute(
                    "SELECT run_id, client_id, round, name, event FROM events "
                    "ORDER BY client_id, round, name"
                )
            )
