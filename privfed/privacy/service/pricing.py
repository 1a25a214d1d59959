"""Pricing events before they reach the ledger: every report's RDP curve is known (cached, or
read from the ledger's curves table) before the report joins a group commit, so that the commit
never computes a curve and one client's expensive event never holds up the others' reports.

The same holds for PLD accounting: a report whose client will have a composition not seen
before (a new round count, a new mechanism) has that composition's PLD epsilon computed before
the commit, and the commit finds it in the epsilon cache (privacy/pld.py). Since a run reports
the same event every round, the composition of the client's next report is started ahead, right
after this one is priced, so that a report seldom waits for a PLD at all.

Cheap curves (Gaussian, sampled Gaussian: about a millisecond) are priced on the event loop.
RQM's exact curve (up to ~3 s at 64 levels) and a new PLD epsilon (1 ms to 1 s) are the
expensive computations: they run in worker processes, never on the loop, each kind in its own
pool, so that a client flooding RQM curves (seconds each) never queues ahead of another
client's PLD (which every report of a new round count needs). Three limits, each answered with a
status that names it:

* one expensive computation in flight per client (429): a client cannot queue up the pool;
* at most ``max_queued`` in flight in each pool (503 with Retry-After);
* a time budget per request (503 with Retry-After): the computation goes on, and its curve is
  cached when it ends, so the client's retry finds it.

A PLD has a shorter wait of its own (``pld_wait_s``): RDP is always there to decide the report
(a valid, looser bound), so a report never waits long for one: not for a cold worker on a loaded
machine (its first PLD waited 7 s, past a client's 5 s timeout), nor a busy pool.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from privfed.privacy.curves import CURVES
from privfed.privacy.events import PrivacyEvent, RQMEvent, event_from_json
from privfed.privacy.ledger import Ledger
from privfed.privacy.pld import EPSILONS, Composition, compute_epsilon


class PricingRefused(Exception):
    """The event cannot be priced now: ``status`` (429/503) and a message that names the limit."""

    def __init__(self, status: int, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s


def _worker_init() -> None:
    """A pricing worker yields the CPU to the service: lowest priority (the event loop answers
    /health and the cheap reports first on a busy machine)."""
    os.nice(19)


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


def is_expensive(event: PrivacyEvent) -> bool:
    return isinstance(event, RQMEvent)


class Pricer:
    def __init__(
        self,
        ledger: Ledger,
        workers: int = 1,
        time_budget_s: float = 10.0,
        max_queued: int = 8,
        on_pld_deferred: Callable[[], None] = lambda: None,
        pld_wait_s: float = 2.0,
    ) -> None:
        self.ledger, self.workers = ledger, workers
        self.time_budget_s, self.max_queued = time_budget_s, max_queued
        self.pld_wait_s = min(pld_wait_s, time_budget_s)
        self._pools: dict[str, ProcessPoolExecutor] = {}  # "curve" (RQM) and "pld", each lazily
        # event JSON (a curve) or ("pld", composition, delta) -> its computation
        self._running: dict[Hashable, asyncio.Future] = {}
        self._by_client: dict[str, Hashable] = {}  # client -> the computation it waits for
        self.on_pld_deferred = on_pld_deferred  # a report decided by RDP: its PLD was not ready

    async def warm_up(self, timeout_s: float = 60.0) -> None:
        """Start the PLD pool and have its workers load the PLD code (PLD is the default
        accountant: nearly every service needs it), and wait for that (about a second; longer
        on a loaded machine): a report that comes before would be decided by RDP. Past
        ``timeout_s`` the service starts anyway, RDP deciding until the worker is up. The curve
        pool starts on the first RQM event: most services never see one."""
        pool = self._executor("pld")
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
                self.workers, mp_context=context, initializer=_worker_init
            )
        return self._pools[kind]

    @staticmethod
    def _kind(key: Hashable) -> str:
        return "curve" if isinstance(key, str) else "pld"  # an event's JSON, or ("pld", ...)

    def _in_flight(self, kind: str) -> int:
        return sum(self._kind(k) == kind for k in self._running)

    async def price(self, client_id: str, event: PrivacyEvent) -> None:
        """Make sure ``event``'s curve is in the process's curve cache, and the client's PLD
        epsilon after it in the epsilon cache (or raise)."""
        text = event.to_json()
        await self._curve(client_id, event, text)
        need = self.ledger.pld_needed(client_id, event)
        if need is not None:  # a new composition: the PLD costs 1 ms to 1 s, off the loop
            composition, delta = need
            try:
                await self._expensive(
                    client_id,
                    ("pld", composition, delta),
                    _pld_epsilon,
                    (composition, delta),
                    self.pld_wait_s,
                )
            except (PricingRefused, BrokenProcessPool, MemoryError, ArithmeticError, ValueError):
                # The pool is busy (or this client waits for another computation, or the worker
                # failed): the report goes on, decided by RDP, a valid bound; a PLD still being
                # computed is cached when it ends.
                self.on_pld_deferred()
                return
        self._compute_ahead(client_id, event)

    def _compute_ahead(self, client_id: str, event: PrivacyEvent) -> None:
        """Start the PLD the client's next report of the same event will need (a run reports
        the same event every round), so that it is ready when that report comes: the PLD's
        latency leaves the report's. Only while the pool is at most half busy, and at most one
        a report, so a client costs at most one more composition than it reports."""
        if self._in_flight("pld") > self.max_queued // 2:
            return
        try:
            ahead = self.ledger.pld_needed(client_id, event, times=2)
        except (ValueError, ArithmeticError):
            return
        if ahead is None or ("pld", *ahead) in self._running:
            return
        try:
            self._start(("pld", *ahead), _pld_epsilon, ahead)
        except (BrokenProcessPool, RuntimeError):  # the pool is shutting down: nothing ahead
            return

    async def _curve(self, client_id: str, event: PrivacyEvent, text: str) -> None:
        if CURVES.get(text) is not None:
            return
        stored = self.ledger.stored_curve(text)
        if stored is not None:
            CURVES.put(text, stored)
            return
        if not is_expensive(event):
            CURVES.curve(text)  # ValueError/ArithmeticError: the caller's 422
            return
        await self._expensive(client_id, text, _curve, (text,))

    async def _expensive(
        self,
        client_id: str,
        key: Hashable,
        work: Callable[..., Any],
        args: tuple,
        budget_s: float | None = None,
    ) -> None:
        """Run ``work(*args)`` in the worker pool (its result is cached when done, whoever
        waits), with the limits of the module docstring."""
        waiting_for = self._by_client.get(client_id)
        if waiting_for is not None and waiting_for != key:
            raise PricingRefused(
                429, "one expensive computation at a time per client: wait for the first", 1
            )
        computation = self._running.get(key)
        if computation is None:
            if self._in_flight(self._kind(key)) >= self.max_queued:
                raise PricingRefused(
                    503, f"pricing queue full ({self.max_queued} expensive computations)", 2
                )
            computation = self._start(key, work, args)
        self._by_client[client_id] = key
        budget_s = self.time_budget_s if budget_s is None else budget_s
        try:
            await asyncio.wait_for(asyncio.shield(computation), budget_s)
        except asyncio.TimeoutError:
            raise PricingRefused(
                503,
                f"pricing this event takes over {budget_s:g} s (the time budget); "
                "its result is kept when done: retry",
                max(1, int(budget_s)),
            ) from None
        finally:
            if self._by_client.get(client_id) == key:
                del self._by_client[client_id]

    def _start(self, key: Hashable, work: Callable[..., Any], args: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        kind = self._kind(key)
        try:
            computation = loop.run_in_executor(self._executor(kind), work, *args)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start a new pool
            self.close(kind)
            computation = loop.run_in_executor(self._executor(kind), work, *args)
        self._running[key] = computation

        def done(future: asyncio.Future) -> None:
            del self._running[key]
            if future.cancelled():
                return
            if future.exception() is None:
                if isinstance(key, str):
                    CURVES.put(key, future.result())
                else:
                    composition, delta = args
                    EPSILONS.put(composition, delta, future.result())
            elif isinstance(future.exception(), BrokenProcessPool):
                self.close(kind)

        computation.add_done_callback(done)
        return computation
