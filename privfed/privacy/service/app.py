"""The accountant service: FastAPI over the SQLite ledger (privacy/ledger.py).

    POST /v1/clients                          register or update a client's budget (operator)
    GET  /v1/clients                          every client with spent and remaining (operator)
    GET  /v1/clients/{client_id}              one client's budget, spent, remaining
    POST /v1/clients/{client_id}/plan         would this event fit? (changes nothing)
    POST /v1/clients/{client_id}/reports      record an event; idempotent on (run, client, round,
                                              name): a repeat returns the first answer
    GET  /v1/clients/{client_id}/reports      the client's recorded events (optionally one key)
    GET  /health                              liveness and the ledger's reachability
    GET  /metrics                             Prometheus

Every /v1 call needs ``Authorization: Bearer <token>``: a client token reads and reports only its
own client id, an operator token everything; no token or an unknown one is a 401, another
client's id a 403. A report is committed (WAL, synchronous=FULL) before the reply; check-and-record
is one ``BEGIN IMMEDIATE`` transaction, so concurrent reports never overspend. Bad input is a 4xx
with a message and changes nothing; bodies over ``max_body_bytes`` are refused with 413.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import threading
import time
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privfed.privacy.events import PrivacyEvent
from privfed.privacy.ledger import Answer, BudgetUnknownError, EventKey, Ledger
from privfed.privacy.service.auth import Principal, TokenStore
from privfed.privacy.service.schemas import (
    ID_PATTERN,
    AnswerOut,
    BudgetIn,
    ClientOut,
    EventOut,
    PlanIn,
    ReportIn,
    to_event,
)

MAX_BODY_BYTES = 64 * 1024
ClientPath = Annotated[str, Path(pattern=ID_PATTERN)]


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413 (declared or
    streamed), before any handler reads them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(send, self.limit)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(send, self.limit)


class _TooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reports = Counter(
            "privfed_accountant_reports", "Reports by outcome", ["outcome"], registry=r
        )
        self.plans = Counter(
            "privfed_accountant_plans", "Plans by outcome", ["outcome"], registry=r
        )
        self.refusals = Counter(
            "privfed_accountant_refusals", "Plans and reports refused by the budget", registry=r
        )
        self.rejected = Counter(
            "privfed_accountant_rejected_requests", "4xx answers", ["status"], registry=r
        )
        self.epsilon = Gauge(
            "privfed_accountant_epsilon_spent", "Epsilon spent per client", ["client"], registry=r
        )
        self.latency = Histogram(
            "privfed_accountant_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )


class Observe:
    """ASGI middleware: latency per route and 4xx counts (a plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware costs more than the ledger's own work per request)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - started)
            if 400 <= status < 500:
                self.metrics.rejected.labels(status=str(status)).inc()


async def principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer <token>`` (401 without a known token)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    who = request.app.state.tokens.resolve(token.strip())
    if who is None:
        raise HTTPException(401, "unknown token", {"WWW-Authenticate": "Bearer"})
    return who


Caller = Annotated[Principal, Depends(principal)]


async def operator(who: Caller) -> Principal:
    if who.role != "operator":
        raise HTTPException(403, "operator token required")
    return who


async def own(client_id: ClientPath, who: Caller) -> str:
    """The path's client id, if the caller may read and report it (403 otherwise)."""
    if not who.may_access(client_id):
        raise HTTPException(403, "a client token reads and reports only its own client id")
    return client_id


OwnClient = Annotated[str, Depends(own)]


def _answer_out(answer: Answer) -> AnswerOut:
    return AnswerOut(**answer.__dict__)


def create_app(ledger: Ledger, tokens: TokenStore, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(
        title="privfed accountant",
        version="1",
        description="Per-client RDP privacy ledger: plan, report (idempotent), read.",
    )
    metrics = ServiceMetrics()
    writer = GroupCommitter(ledger)
    app.state.ledger, app.state.metrics, app.state.tokens = ledger, metrics, tokens

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg')}"}, status_code=422)

    def client_out(client_id: str) -> ClientOut:
        try:
            budget, delta = ledger.budget(client_id)
        except BudgetUnknownError:
            raise HTTPException(404, f"unknown client {client_id!r}") from None
        spent = ledger.spent(client_id)
        metrics.epsilon.labels(client=client_id).set(spent)
        return ClientOut(
            client_id=client_id,
            epsilon_budget=budget,
            delta=delta,
            epsilon_spent=spent,
            epsilon_remaining=max(0.0, budget - spent),
            events=ledger.count(client_id),
        )

    @app.get("/health")
    def health() -> dict:
        ledger.clients()  # the database answers
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/clients", status_code=201, dependencies=[Depends(operator)])
    def register(body: BudgetIn) -> ClientOut:
        ledger.set_budget(body.client_id, body.epsilon, body.delta)
        return client_out(body.client_id)

    @app.get("/v1/clients", dependencies=[Depends(operator)])
    def list_clients() -> list[ClientOut]:
        return [client_out(c) for c in ledger.clients()]

    @app.get("/v1/clients/{client_id}")
    def read_client(client_id: OwnClient) -> ClientOut:
        return client_out(client_id)

    def _event(body: PlanIn | ReportIn):
        try:
            return to_event(body.event)
        except (ValueError, TypeError) as err:
            raise HTTPException(422, f"event: {err}") from None

    @app.post("/v1/clients/{client_id}/plan")
    def plan(client_id: OwnClient, body: PlanIn) -> AnswerOut:
        event = _event(body)
        try:
            answer = ledger.plan(client_id, event)
        except BudgetUnknownError:
            raise HTTPException(404, f"unknown client {client_id!r}") from None
        metrics.plans.labels(outcome="fits" if answer.accepted else "refused").inc()
        if not answer.accepted:
            metrics.refusals.inc()
        return _answer_out(answer)

    @app.post("/v1/clients/{client_id}/reports")
    async def report(client_id: OwnClient, body: ReportIn) -> AnswerOut:
        event = _event(body)
        key = EventKey(body.run_id, client_id, body.round, body.name)
        try:
            answer = await asyncio.wrap_future(writer.submit(key, event))
        except BudgetUnknownError:
            raise HTTPException(404, f"unknown client {client_id!r}") from None
        except ValueError as err:  # the key was recorded with a different event
            raise HTTPException(409, str(err)) from None
        outcome = "duplicate" if answer.duplicate else "recorded" if answer.accepted else "refused"
        metrics.reports.labels(outcome=outcome).inc()
        if not answer.accepted:
            metrics.refusals.inc()
        metrics.epsilon.labels(client=client_id).set(answer.epsilon_spent)
        return _answer_out(answer)

    @app.get("/v1/clients/{client_id}/reports")
    def events(
        client_id: OwnClient,
        run_id: str | None = None,
        round: int | None = None,
        name: str | None = None,
    ) -> list[EventOut]:
        rows = ledger.keyed_events(client_id)
        return [
            EventOut(run_id=r, round=n, name=nm, event=json.loads(ev))
            for r, n, nm, ev in rows
            if (run_id is None or r == run_id)
            and (round is None or n == round)
            and (name is None or nm == name)
        ]

    return BodyLimit(Observe(app, metrics), max_body_bytes)  # type: ignore[return-value]


class GroupCommitter:
    """Durable reports at many per fsync: concurrent reports queue up, one writer thread records
    what has queued in one ledger transaction and answers each only after its COMMIT. Each
    report is still checked against the budget on its own, in arrival order."""

    def __init__(self, ledger: Ledger, max_batch: int = 256) -> None:
        self.ledger, self.max_batch = ledger, max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    def submit(self, key: EventKey, event: PrivacyEvent) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((key, event, future))
        return future

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                results = self.ledger.report_many([(k, e) for k, e, _ in batch])
            except Exception as err:  # the transaction failed: nothing of the batch is recorded
                results = [err] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
