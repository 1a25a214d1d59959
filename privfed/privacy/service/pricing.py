"""Pricing events before they reach the ledger: no request path of the accountant service
computes an RDP curve past a few microseconds, or any PLD, on its event loop or in its group
commit. Every such computation runs in a worker process, and the ledger (``computes_pld =
False``) only reads the caches this module fills:

* a report's curve, and the PLD epsilon of the composition it will commit to;
* a plan's: the client's composition now and with the event;
* a status (``GET /v1/clients/{id}``, registering a client): the composition now;
* ahead: the next report's composition (a run reports the same event every round), so that a
  report seldom waits for a PLD at all.

Gaussian and client-given RDP curves are closed forms, computed on the loop (microseconds). A
sampled Gaussian's curve (1 to 50 ms) and a PLD epsilon (1 ms to 1 s) go to the "fast" pool,
RQM's exact curve (up to seconds) to the "slow" pool, so that a client flooding RQM events never
queues ahead of another client's PLD. Both pools' workers are niced, single-threaded, and die
with the service (``PR_SET_PDEATHSIG``: a ``kill -9`` of the service orphans nothing).

**One client at a time, in order.** A client's requests are priced one after another
(:meth:`Pricer.turn`), and a report priced but not yet committed stays *pending*: the next
report of that client is priced as the composition the commit will see, its pending reports
included. So 30 concurrent reports of one client are each decided by PLD, and accept exactly
what PLD fits.

**Limits, each answered with a status that names it** (a retry is always safe: nothing is
recorded):

* a client has at most one computation in flight, compute-ahead included, and at most
  ``max_waiting`` requests queued for its turn (429);
* per client, a quota of worker seconds (``work_quota``: a burst, refilled at a rate): past it,
  a curve is refused (429, with the Retry-After that the refill needs) and a PLD is not started
  (RDP decides the report, a valid, looser bound: a report is never refused for a tighter bound
  it did not ask for);
* at most ``max_queued`` computations in flight per pool (503 with Retry-After);
* a time budget per request (503 with Retry-After): the computation goes on, and its result is
  cached when it ends, so the client's retry finds it.

A PLD has a shorter wait of its own (``pld_wait_s``): RDP is always there to decide the report,
so a report never waits long for one (a cold worker on a loaded machine, a busy pool).
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from privfed.privacy.curves import CURVES
from privfed.privacy.events import PrivacyEvent, event_from_json
from privfed.privacy.ledger import Ledger
from privfed.privacy.pld import EPSILONS, Composition, compute_epsilon

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class PricingRefused(Exception):
    """The event cannot be priced now: ``status`` (429/503) and a message that names the limit."""

    def __init__(self, status: int, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s


def _worker_init(service_pid: int) -> None:
    """A pricing worker yields the CPU to the service (lowest priority: the event loop answers
    /health and the cheap reports first on a busy machine), and dies with it: the kernel sends
    it SIGKILL when the service's process ends, however it ends."""
    os.nice(19)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != service_pid:  # the service died before prctl: do not outlive it
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        pass


def _timed(work: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """In a pricing worker: ``work(*args)`` and the worker seconds it took (the client's quota
    is charged with them)."""
    started = time.process_time()
    result = work(*args)
    return result, time.process_time() - started


def _curve(event_json: str) -> np.ndarray:
    """In a pricing worker: the event's curve (RQM keeps its per-coordinate cache there)."""
    return event_from_json(event_json).rdp()


def _warm_up() -> None:
    """In a pricing worker, at start: import dp-accounting's PLD code (about a second), so that
    the first report that needs a PLD does not wait for it."""
    import dp_accounting.pld.privacy_loss_distribution  # noqa: F401


def _pld_epsilon(composition: Composition, delta: float) -> float:
    """In a pricing worker: a composition's PLD epsilon (the worker keeps the mechanisms' base
    distributions cached)."""
    return compute_epsilon(composition, delta)


# Where each curve cost is computed (privacy/events.py ``curve_cost``): a pool, or None for
# the event loop itself (microseconds).
POOL_OF_COST = {"closed_form": None, "series": "fast", "numeric": "slow"}


def pool_of(event: PrivacyEvent) -> str | None:
    """Where an event's curve is computed: "slow" (RQM: up to seconds), "fast" (a sampled
    Gaussian: up to ~50 ms), None for a closed form (microseconds, on the event loop)."""
    return POOL_OF_COST[event.curve_cost]


@dataclass
class WorkQuota:
    """Worker seconds per client as a token bucket: ``burst`` seconds at most, refilled at
    ``rate`` seconds per second. An honest run costs one PLD (1 ms to 1 s) per round and one
    curve per distinct event; a client that sends a new expensive event each request exhausts
    it and is refused until it refills."""

    burst: float = 30.0
    rate: float = 0.25

    def __post_init__(self) -> None:
        self._level: dict[str, tuple[float, float]] = {}  # client -> (seconds left, at)

    def left(self, client_id: str) -> float:
        level, at = self._level.get(client_id, (self.burst, time.monotonic()))
        now = time.monotonic()
        return min(self.burst, level + (now - at) * self.rate)

    def charge(self, client_id: str, seconds: float) -> None:
        self._level[client_id] = (self.left(client_id) - seconds, time.monotonic())
        if len(self._level) > 65536:  # full buckets carry no information: forget them
            now = time.monotonic()
            self._level = {
                c: (lv, at)
                for c, (lv, at) in self._level.items()
                if lv + (now - at) * self.rate < self.burst
            }

    def retry_after_s(self, client_id: str) -> int:
        """Seconds until the client has a positive balance again."""
        return max(1, int(-self.left(client_id) / self.rate) + 1) if self.rate > 0 else 3600


class WorkQuotaSpent(Exception):
    """The client's worker-second quota is spent (a PLD is skipped; a curve is a 429)."""


class Pricer:
    def __init__(
        self,
        ledger: Ledger,
        workers: int = 2,
        time_budget_s: float = 10.0,
        max_queued: int = 8,
        on_pld_deferred: Callable[[], None] = lambda: None,
        pld_wait_s: float = 2.0,
        work_quota: WorkQuota | None = None,
        max_waiting: int = 64,
    ) -> None:
        self.ledger, self.workers = ledger, workers
        self.time_budget_s, self.max_queued = time_budget_s, max_queued
        self.pld_wait_s = min(pld_wait_s, time_budget_s)
        self.quota = work_quota or WorkQuota()
        self.max_waiting = max_waiting
        self._pools: dict[str, ProcessPoolExecutor] = {}  # "fast" and "slow", each lazily
        # (pool, event JSON) for a curve, or ("pld", composition, delta) -> its computation
        self._running: dict[tuple, asyncio.Future] = {}
        self._by_client: dict[str, tuple] = {}  # client -> its computation in flight
        self._turns: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}  # client -> requests holding or awaiting its turn
        self._pending: dict[str, list[tuple[object, str]]] = {}  # priced, not yet committed
        self.on_pld_deferred = on_pld_deferred  # a report decided by RDP: its PLD was not ready

    async def warm_up(self, timeout_s: float = 60.0) -> None:
        """Start the fast pool and have its workers load the PLD code (PLD is the default
        accountant: nearly every service needs it), and wait for that (about a second; longer
        on a loaded machine): a report that comes before would be decided by RDP. Past
        ``timeout_s`` the service starts anyway, RDP deciding until the worker is up. The slow
        pool starts on the first RQM event: most services never see one."""
        pool = self._executor("fast")
        loading = [asyncio.wrap_future(pool.submit(_warm_up)) for _ in range(self.workers)]
        try:
            await asyncio.wait_for(asyncio.gather(*loading), timeout_s)
        except (asyncio.TimeoutError, BrokenProcessPool):
            pass  # reports are decided by RDP (a valid bound) until the pool can answer

    def close(self, kind: str | None = None) -> None:
        """Shut down the pools (or the one of ``kind``)."""
        for name in [kind] if kind is not None else list(self._pools):
            pool = self._pools.pop(name, None)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _executor(self, kind: str) -> ProcessPoolExecutor:
        if kind not in self._pools:  # started on first use
            context = multiprocessing.get_context("spawn")  # no fork of a running event loop
            # One BLAS thread per worker: a multi-threaded matrix product would take every core.
            # (Spawned workers read these when they import numpy; the service's own numpy is
            # loaded already and unaffected.)
            for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(name, "1")
            self._pools[kind] = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
        return self._pools[kind]

    @staticmethod
    def _kind(key: tuple) -> str:
        return "slow" if key[0] == "slow" else "fast"

    def _in_flight(self, kind: str) -> int:
        return sum(self._kind(k) == kind for k in self._running)

    # -- a client's turn, and its reports in flight ----------------------------------------
    @asynccontextmanager
    async def turn(self, client_id: str) -> AsyncIterator[None]:
        """Price one request of ``client_id`` at a time, in arrival order (429 past
        ``max_waiting`` queued requests: a client cannot hold the service's memory)."""
        if self._waiting.get(client_id, 0) >= self.max_waiting:
            raise PricingRefused(
                429, f"over {self.max_waiting} requests of this client are queued: slow down", 1
            )
        self._waiting[client_id] = self._waiting.get(client_id, 0) + 1
        lock = self._turns.setdefault(client_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            self._waiting[client_id] -= 1
            if not self._waiting[client_id]:
                del self._waiting[client_id], self._turns[client_id]

    def hold(self, client_id: str, event: PrivacyEvent) -> object:
        """A priced report goes to the commit: until it is answered, the client's next reports
        are priced with it. Returns the ticket for :meth:`release`."""
        ticket = object()
        self._pending.setdefault(client_id, []).append((ticket, event.to_json()))
        return ticket

    def release(self, client_id: str, ticket: object) -> None:
        pending = [p for p in self._pending.get(client_id, []) if p[0] is not ticket]
        if pending:
            self._pending[client_id] = pending
        else:
            self._pending.pop(client_id, None)

    def _before(self, client_id: str) -> list[str]:
        return [text for _, text in self._pending.get(client_id, [])]

    # -- pricing --------------------------------------------------------------------------
    async def price(self, client_id: str, event: PrivacyEvent, plan: bool = False) -> None:
        """Make sure ``event``'s curve is cached, and the PLD epsilon of the client's
        composition after it: a report's after its pending reports too, a plan's (``plan``)
        after what is recorded, and before it (a plan answers both); or raise
        :class:`PricingRefused`."""
        await self._curve(client_id, event)
        before = [] if plan else self._before(client_id)
        if plan:
            await self.price_spent(client_id)
        need = self.ledger.pld_needed(client_id, event, before=before)
        if await self._pld(client_id, need) and not plan:
            self._compute_ahead(client_id, event, before)

    async def price_spent(self, client_id: str) -> None:
        """The PLD epsilon of what the client has recorded (its status), where it can."""
        await self._pld(client_id, self.ledger.pld_needed(client_id, None))

    async def _pld(self, client_id: str, need: tuple[Composition, float] | None) -> bool:
        """Wait (``pld_wait_s`` at most) for a composition's PLD epsilon; False where it was
        not ready (RDP decides, a valid bound; a computation still running is cached when it
        ends)."""
        if need is None:
            return True
        key = ("pld", *need)
        try:
            await self._expensive(client_id, key, _pld_epsilon, need, self.pld_wait_s)
        except (
            PricingRefused,
            WorkQuotaSpent,
            BrokenProcessPool,
            MemoryError,
            ArithmeticError,
            ValueError,
        ):
            self.on_pld_deferred()
            return False
        return True

    def _compute_ahead(self, client_id: str, event: PrivacyEvent, before: Sequence[str]) -> None:
        """Start the PLD the client's next report of the same event will need, so that it is
        ready when that report comes: the PLD's latency leaves the report's. Only while the
        client has nothing else in flight and its quota lasts (ahead work is the client's work),
        and the pool is at most half busy."""
        if client_id in self._by_client or self._in_flight("fast") > self.max_queued // 2:
            return
        if self.quota.left(client_id) <= 0:
            return
        try:
            ahead = self.ledger.pld_needed(client_id, event, times=2, before=before)
        except (ValueError, ArithmeticError):
            return
        if ahead is None or ("pld", *ahead) in self._running:
            return
        try:
            self._start(client_id, ("pld", *ahead), _pld_epsilon, ahead)
        except (BrokenProcessPool, RuntimeError):  # the pool is shutting down: nothing ahead
            return

    async def _curve(self, client_id: str, event: PrivacyEvent) -> None:
        text = event.to_json()
        if CURVES.get(text) is not None:
            return
        stored = self.ledger.stored_curve(text)
        if stored is not None:
            CURVES.put(text, stored)
            return
        kind = pool_of(event)
        if kind is None:  # a closed form: microseconds
            CURVES.curve(text)  # ValueError/ArithmeticError: the caller's 422
            return
        try:
            await self._expensive(client_id, (kind, text), _curve, (text,))
        except WorkQuotaSpent:
            raise PricingRefused(
                429,
                f"this client's pricing quota ({self.quota.burst:g} worker seconds, refilled "
                f"at {self.quota.rate:g}/s) is spent: new events are priced again after the "
                "Retry-After",
                self.quota.retry_after_s(client_id),
            ) from None

    async def _expensive(
        self,
        client_id: str,
        key: tuple,
        work: Callable[..., Any],
        args: tuple,
        budget_s: float | None = None,
    ) -> None:
        """Run ``work(*args)`` in a worker pool (its result is cached when done, whoever
        waits), with the limits of the module docstring."""
        budget_s = self.time_budget_s if budget_s is None else budget_s
        other = self._by_client.get(client_id)
        if other is not None and other != key:  # one at a time: its earlier one first
            started = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(self._running[other]), budget_s)
            except asyncio.TimeoutError:
                raise PricingRefused(
                    429, "one expensive computation at a time per client: wait for the first", 1
                ) from None
            except Exception:  # noqa: BLE001 (its failure was its own requester's answer)
                pass
            budget_s = max(0.0, budget_s - (time.monotonic() - started))
        computation = self._running.get(key)
        if computation is None:
            if self.quota.left(client_id) <= 0:
                raise WorkQuotaSpent(client_id)
            if self._in_flight(self._kind(key)) >= self.max_queued:
                raise PricingRefused(
                    503, f"pricing queue full ({self.max_queued} expensive computations)", 2
                )
            computation = self._start(client_id, key, work, args)
        try:
            await asyncio.wait_for(asyncio.shield(computation), budget_s)
        except asyncio.TimeoutError:
            raise PricingRefused(
                503,
                f"pricing this event takes over {budget_s:g} s (the time budget); "
                "its result is kept when done: retry",
                max(1, int(budget_s)),
            ) from None

    def _start(
        self, client_id: str, key: tuple, work: Callable[..., Any], args: tuple
    ) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        kind = self._kind(key)
        try:
            computation = loop.run_in_executor(self._executor(kind), _timed, work, *args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start a new pool
            self.close(kind)
            computation = loop.run_in_executor(self._executor(kind), _timed, work, *args)
        self._by_client[client_id] = key  # the starter's until it ends, whoever waits
        result: asyncio.Future = loop.create_future()

        def done(future: asyncio.Future) -> None:
            del self._running[key]
            if self._by_client.get(client_id) == key:
                del self._by_client[client_id]
            if future.cancelled():
                result.cancel()
                return
            failure = future.exception()
            if failure is not None:
                if isinstance(failure, BrokenProcessPool):
                    self.close(kind)
                result.set_exception(failure)
                return
            value, seconds = future.result()
            self.quota.charge(client_id, seconds)
            if key[0] == "pld":
                composition, delta = args
                EPSILONS.put(composition, delta, value)
            else:
                CURVES.put(key[1], value)
            result.set_result(None)

        computation.add_done_callback(done)
        self._running[key] = result
        result.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        return result
