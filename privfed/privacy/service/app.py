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
import json
import re
import time
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
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
REPORTS_ROUTE = "/v1/clients/{client_id}/reports"
REPORTS_PATH = re.compile(r"/v1/clients/(" + ID_PATTERN.strip("^$") + r")/reports")
REPORT_SCHEMA = ReportIn.model_json_schema(ref_template="#/components/schemas/{model}")


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
        self._latency: dict[str, object] = {}

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
            histogram = self._latency.get(route)
            if histogram is None:  # labels() takes a lock and checks names: once per route
                histogram = self._latency[route] = self.metrics.latency.labels(route=route)
            histogram.observe(time.perf_counter() - started)
            if 400 <= status < 500:
                self.metrics.rejected.labels(status=str(status)).inc()


class ApiError(Exception):
    """A 4xx answer with a message, raised by code that both request paths share."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}

    def body(self) -> bytes:
        return json.dumps({"detail": self.detail}).encode()


def authenticate(tokens: TokenStore, authorization: str) -> Principal:
    """The caller, from ``Authorization: Bearer <token>`` (401 without a known token)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    who = tokens.resolve(token.strip())
    if who is None:
        raise ApiError(401, "unknown token", {"WWW-Authenticate": "Bearer"})
    return who


def authorize(who: Principal, client_id: str) -> None:
    if not who.may_access(client_id):
        raise ApiError(403, "a client token reads and reports only its own client id")


def first_error(errors: list, prefix: tuple = ()) -> str:
    """One line for a validation failure: where (dotted) and why."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in (*prefix, *first.get("loc", ())))
    return f"{where}: {first.get('msg')}"


async def principal(request: Request) -> Principal:
    return authenticate(request.app.state.tokens, request.headers.get("authorization", ""))


Caller = Annotated[Principal, Depends(principal)]


async def operator(who: Caller) -> Principal:
    if who.role != "operator":
        raise ApiError(403, "operator token required")
    return who


async def own(client_id: ClientPath, who: Caller) -> str:
    """The path's client id, if the caller may read and report it (403 otherwise)."""
    authorize(who, client_id)
    return client_id


OwnClient = Annotated[str, Depends(own)]


def _answer_out(answer: Answer) -> AnswerOut:
    return AnswerOut(**answer.__dict__)


def create_app(
    ledger: Ledger,
    tokens: TokenStore,
    max_body_bytes: int = MAX_BODY_BYTES,
    fast_reports: bool = True,
) -> FastAPI:
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
        return JSONResponse({"detail": first_error(err.errors())}, status_code=422)

    @app.exception_handler(ApiError)
    async def refused(_: Request, err: ApiError) -> Response:
        return Response(err.body(), err.status, err.headers, media_type="application/json")

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
            raise ApiError(422, f"event: {err}") from None

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

    async def record_report(client_id: str, authorization: str, raw_body: bytes) -> bytes:
        """POST /v1/clients/{id}/reports, for both request paths: the JSON answer, or ApiError."""
        authorize(authenticate(tokens, authorization), client_id)
        try:
            body = ReportIn.model_validate_json(raw_body)
        except ValidationError as err:
            raise ApiError(422, first_error(err.errors(), prefix=("body",))) from None
        event = _event(body)
        key = EventKey(body.run_id, client_id, body.round, body.name)
        try:
            answer = await writer.submit(key, event)
        except BudgetUnknownError:
            raise ApiError(404, f"unknown client {client_id!r}") from None
        except ValueError as err:  # the key was recorded with a different event
            raise ApiError(409, str(err)) from None
        outcome = "duplicate" if answer.duplicate else "recorded" if answer.accepted else "refused"
        metrics.reports.labels(outcome=outcome).inc()
        if not answer.accepted:
            metrics.refusals.inc()
        metrics.epsilon.labels(client=client_id).set(answer.epsilon_spent)
        return _answer_out(answer).model_dump_json().encode()

    report_body = {"required": True, "content": {"application/json": {"schema": REPORT_SCHEMA}}}

    @app.post(
        "/v1/clients/{client_id}/reports",
        response_model=AnswerOut,
        openapi_extra={"requestBody": report_body},
    )
    async def report(client_id: ClientPath, request: Request) -> Response:
        """Record an event; idempotent on (run_id, client, round, name). With ``fast_reports``
        (the default) :class:`FastReports` answers this route before FastAPI sees it."""
        answer = await record_report(
            client_id, request.headers.get("authorization", ""), await request.body()
        )
        return Response(answer, media_type="application/json")

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

    served: ASGIApp = app
    if fast_reports:
        route = next(r for r in app.routes if getattr(r, "path", None) == REPORTS_ROUTE)
        served = FastReports(app, record_report, route)
    return BodyLimit(Observe(served, metrics), max_body_bytes)  # type: ignore[return-value]


class FastReports:
    """ASGI: ``POST /v1/clients/{id}/reports``, the one hot route, answered without FastAPI's
    routing, dependency and response machinery, which cost ~250 µs a report, more than the
    ledger's own work. It runs the same ``record_report`` as the FastAPI route (which documents
    it in the OpenAPI schema and serves it when this is off; the tests run both), so checks,
    errors and answers are the same. Any other request, or a client id outside the pattern
    (FastAPI answers its 422), passes through."""

    def __init__(self, app: ASGIApp, record_report, route: object) -> None:
        self.app, self.record_report, self.route = app, record_report, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = REPORTS_PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # the latency histogram's label
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
        headers = [(b"content-type", b"application/json")]
        try:
            body = await self.record_report(
                match.group(1), authorization.decode("latin-1"), b"".join(chunks)
            )
            status = 200
        except ApiError as err:
            status, body = err.status, err.body()
            headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class GroupCommitter:
    """Durable reports at many per fsync, on the event loop: the reports that arrive in one loop
    iteration are recorded in one ledger transaction (``report_many``), and each is answered
    only after that COMMIT. Each is still checked against the budget on its own, in arrival
    order.

    The transaction runs on the loop thread, blocking it for about a millisecond per batch:
    requests that arrive meanwhile wait in their sockets and form the next batch. A writer
    thread did the same with two thread hand-offs per report, which cost more CPU than the
    ledger itself and held reports back behind the GIL's 5 ms switch interval."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._pending: list[tuple[EventKey, PrivacyEvent, asyncio.Future]] = []

    def submit(self, key: EventKey, event: PrivacyEvent) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._pending:  # the first of this iteration's batch: flush after the others
            loop.call_soon(self._flush)
        self._pending.append((key, event, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            results: list = self.ledger.report_many([(k, e) for k, e, _ in batch])
        except Exception as err:  # the transaction failed: nothing of the batch is recorded
            results = [err] * len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.cancelled():  # the client went away; its report stands (or not) as is
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
