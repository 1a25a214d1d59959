"""Pricing events before they reach the ledger: every report's RDP curve is known (cached, or
read from the ledger's curves table) before the report joins a group commit, so that the commit
never computes a curve and one client's expensive event never holds up the others' reports.

Cheap events (Gaussian, sampled Gaussian: under a millisecond) are priced on the event loop.
RQM's exact curve is the expensive one (up to ~0.5 s at 64 levels): it is computed in a worker
process, never on the loop, with three limits, each answered with a status that names it:

* one expensive pricing in flight per client (429): a client cannot queue up the pool;
* at most ``max_queued`` in flight in all (503 with Retry-After);
* a time budget per request (503 with Retry-After): the computation goes on, and its curve is
  cached when it ends, so the client's retry finds it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from privfed.privacy.curves import CURVES
from privfed.privacy.events import PrivacyEvent, RQMEvent, event_from_json
from privfed.privacy.ledger import Ledger


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


def is_expensive(event: PrivacyEvent) -> bool:
    return isinstance(event, RQMEvent)


class Pricer:
    def __init__(
        self,
        ledger: Ledger,
        workers: int = 1,
        time_budget_s: float = 10.0,
        max_queued: int = 8,
    ) -> None:
        self.ledger, self.workers = ledger, workers
        self.time_budget_s, self.max_queued = time_budget_s, max_queued
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[str, asyncio.Future] = {}  # event JSON -> its computation
        self._by_client: dict[str, str] = {}  # client -> the event JSON it waits for

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:  # started on the first expensive event: most services need none
            context = multiprocessing.get_context("spawn")  # no fork of a running event loop
            # One BLAS thread per worker: a multi-threaded matrix product would take every core.
            # (Spawned workers read these when they import numpy; the service's own numpy is
            # loaded already and unaffected.)
            for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(name, "1")
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_worker_init
            )
        return self._pool

    async def price(self, client_id: str, event: PrivacyEvent) -> None:
        """Make sure ``event``'s curve is in the process's curve cache (or raise)."""
        text = event.to_json()
        if CURVES.get(text) is not None:
            return
        stored = self.ledger.stored_curve(text)
        if stored is not None:
            CURVES.put(text, stored)
            return
        if not is_expensive(event):
            CURVES.curve(text)  # ValueError/ArithmeticError: the caller's 422
            return
        waiting_for = self._by_client.get(client_id)
        if waiting_for is not None and waiting_for != text:
            raise PricingRefused(
                429, "one expensive event (rqm) at a time per client: wait for the first", 1
            )
        computation = self._running.get(text)
        if computation is None:
            if len(self._running) >= self.max_queued:
                raise PricingRefused(
                    503, f"pricing queue full ({self.max_queued} expensive events)", 2
                )
            computation = self._start(text)
        self._by_client[client_id] = text
        try:
            await asyncio.wait_for(asyncio.shield(computation), self.time_budget_s)
        except asyncio.TimeoutError:
            raise PricingRefused(
                503,
                f"pricing this event takes over {self.time_budget_s:g} s (the time budget); "
                "its curve is kept when done: retry",
                int(self.time_budget_s),
            ) from None
        finally:
            if self._by_client.get(client_id) == text:
                del self._by_client[client_id]

    def _start(self, text: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        try:
            computation = loop.run_in_executor(self._executor(), _curve, text)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start a new pool
            self.close()
            computation = loop.run_in_executor(self._executor(), _curve, text)
        self._running[text] = computation

        def done(future: asyncio.Future) -> None:
            del self._running[text]
            if future.cancelled():
                return
            if future.exception() is None:
                CURVES.put(text, future.result())
            elif isinstance(future.exception(), BrokenProcessPool):
                self.close()

        computation.add_done_callback(done)
        return computation
