"""The accountant service: FastAPI over the SQLite ledger (privacy/ledger.py).

    POST /v1/clients                          register or update a client's budget (operator)
    GET  /v1/clients                          every client with spent and remaining (operator)
    GET  /v1/clients/{client_id}              one client's budget, spent, remaining
    POST /v1/clients/{client_id}/plan         would this event fit? (changes nothing)
    POST /v1/clients/{client_id}/reports      record an event; idempotent on (run, client, round,
                                              name): a repeat returns the first answer
    GET  /v1/clients/{client_id}/reports      the client's recorded events (optionally one key)
    GET  /health                              200 only if the ledger can commit now (503 + why)
    GET  /metrics                             Prometheus (aggregates; per client with a flag)

Every /v1 call needs ``Authorization: Bearer <token>``: a client token reads and reports only its
own client id, an operator token everything; no token or an unknown one is a 401, another
client's id a 403. A report is committed (WAL, synchronous=FULL) before the reply; check-and-record
is one ``BEGIN IMMEDIATE`` transaction, so concurrent reports never overspend (commit.py: group
commit). Every event is priced before it joins a commit (pricing.py: bounded cost, expensive
curves in a worker process). Status codes, the same on every route:

* 400 more than one ``Authorization`` header; 401/403 as above; 404 unknown client;
* 409 a report that repeats a recorded key with another event;
* 413 a body over ``max_body_bytes`` (declared or streamed); 415 a body that is not JSON; 422 a
  body or event that does not validate or cannot be priced, with the field and the reason;
* 429 a client over its limits (its queue, its worker-second quota, its stored bytes), 503
  pricing over the service's (a pool's queue, the time budget) or a ledger that cannot commit
  (disk full, read-only, I/O): all with ``Retry-After``; nothing is recorded, so a retry is
  safe.

Bodies are parsed the same way on every route (pydantic, strict JSON: no BOM, no NaN, no string
or boolean for a number). A repeated report returns the first answer, stored with the event.
Epsilon that is infinite is written as the string ``"Infinity"`` (JSON has no infinity).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp

from privfed.config import one_line
from privfed.privacy.events import PrivacyEvent
from privfed.privacy.ledger import (
    Answer,
    BudgetUnknownError,
    EventKey,
    KeyConflictError,
    Ledger,
    StorageQuotaError,
)
from privfed.privacy.service.auth import TokenStore
from privfed.privacy.service.commit import GroupCommitter, StorageError
from privfed.privacy.service.fast_reports import REPORTS_ROUTE, FastReports
from privfed.privacy.service.metrics import ServiceMetrics
from privfed.privacy.service.middleware import Observe, RequestGuard
from privfed.privacy.service.pricing import Pricer, PricingRefused, WorkQuota
from privfed.privacy.service.requests import (
    ApiError,
    ClientPath,
    OwnClient,
    authenticate,
    authorize,
    operator,
    parse,
)
from privfed.privacy.service.schemas import (
    AnswerOut,
    BudgetIn,
    ClientOut,
    EventOut,
    PlanIn,
    ReportIn,
)

MAX_BODY_BYTES = 64 * 1024
MAX_CLIENT_BYTES = 16 * 1024 * 1024  # what one client may store (a run: ~1 kB a round)
HEALTH_TIMEOUT_S = 2.0
BODIES = (BudgetIn, PlanIn, ReportIn)


def _answer_out(answer: Answer) -> AnswerOut:
    return AnswerOut(**answer.__dict__)


def _refused(err: PricingRefused) -> ApiError:
    return ApiError(err.status, err.detail, {"Retry-After": str(err.retry_after_s)})


def _body_doc(model: type[BaseModel]) -> dict:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


ERROR = {  # every 4xx/5xx body: one line saying what and where
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
_ERRORS = {
    "400": "more than one Authorization header",
    "401": "no token, or an unknown one",
    "403": "a client token for another client, or an operator route",
    "404": "unknown client",
    "409": "a report that repeats a recorded key with another event",
    "413": "a body over the size limit",
    "415": "a body that is not application/json",
    "422": "a body, path or event that does not validate or cannot be priced",
    "429": "this client over its limits (queue, pricing quota, stored bytes): Retry-After",
    "503": "pricing over the service's limits, or a ledger that cannot commit: Retry-After",
}


def _document_errors(schema: dict) -> None:
    """Every status a route answers, in its schema, with the body it has (``{"detail": str}``;
    FastAPI's default 422 body is a list, which this service never sends)."""
    components = schema["components"]["schemas"]
    components["Error"] = ERROR
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            statuses = {"400", "413", "503"}  # any route (RequestGuard; storage)
            if method == "post":
                statuses |= {"415", "422", "429"}
            if path.startswith("/v1/"):
                statuses |= {"401", "403"}
            if "{client_id}" in path:
                statuses |= {"404", "422"}
            if path.endswith("/reports") and method == "post":
                statuses.add("409")
            responses = operation["responses"]
            for status in sorted(statuses):
                responses[status] = {"description": _ERRORS[status], **error}


def create_app(
    ledger: Ledger,
    tokens: TokenStore,
    max_body_bytes: int = MAX_BODY_BYTES,
    fast_reports: bool = True,
    per_client_metrics: bool = False,
    pricing_workers: int = 2,
    pricing_budget_s: float = 10.0,
    pld_wait_s: float = 2.0,
    work_quota: WorkQuota | None = None,
    max_client_bytes: int | None = MAX_CLIENT_BYTES,
) -> ASGIApp:
    metrics = ServiceMetrics(per_client=per_client_metrics)
    ledger.computes_pld = False  # the pricer computes every PLD, in a worker (pricing.py)
    ledger.max_client_bytes = max_client_bytes
    writer = GroupCommitter(ledger, on_batch=metrics.committed)
    pricer = Pricer(
        ledger,
        workers=pricing_workers,
        time_budget_s=pricing_budget_s,
        on_pld_deferred=metrics.pld_deferred.inc,
        pld_wait_s=pld_wait_s,
        work_quota=work_quota,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await pricer.warm_up()
        yield
        pricer.close()
        writer.close()

    app = FastAPI(
        title="privfed accountant",
        version="1",
        description="Per-client privacy ledger (PLD and RDP): plan, report (idempotent), read.",
        lifespan=lifespan,
    )
    app.state.ledger, app.state.metrics, app.state.tokens = ledger, metrics, tokens
    app.state.writer, app.state.pricer = writer, pricer

    def openapi() -> dict:
        """The generated schema, plus the request bodies the routes parse themselves."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODIES:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            _document_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": one_line(err.errors())}, status_code=422)

    @app.exception_handler(ApiError)
    async def refused(_: Request, err: ApiError) -> Response:
        return Response(err.body(), err.status, err.headers, media_type="application/json")

    @app.exception_handler(sqlite3.Error)
    async def storage(_: Request, err: sqlite3.Error) -> Response:
        return unavailable(f"ledger storage: {err}")

    @asynccontextmanager
    async def turn(client_id: str):
        """The client's turn to be priced (pricing.py): its requests one at a time, in order."""
        try:
            async with pricer.turn(client_id):
                yield
        except PricingRefused as err:
            raise _refused(err) from None

    def unavailable(reason: str) -> Response:
        body = json.dumps({"detail": reason}).encode()
        return Response(body, 503, {"Retry-After": "2"}, media_type="application/json")

    async def client_status(client_id: str) -> ClientOut:
        """One client's status, its PLD epsilon computed in a pricing worker first."""
        try:
            async with pricer.turn(client_id):
                await pricer.price_spent(client_id)
        except PricingRefused:
            pass  # the status says which bound gave epsilon: RDP here, never a wait
        return client_out(client_id)

    def client_out(client_id: str) -> ClientOut:
        try:
            budget, delta = ledger.budget(client_id)
        except BudgetUnknownError:
            raise HTTPException(404, f"unknown client {client_id!r}") from None
        spent = ledger.spent_by(client_id)
        metrics.spent(client_id, spent.epsilon, budget)
        return ClientOut(
            client_id=client_id,
            epsilon_budget=budget,
            delta=delta,
            epsilon_spent=spent.epsilon,
            epsilon_remaining=max(0.0, budget - spent.epsilon),
            events=ledger.count(client_id),
            method=ledger.method(client_id),
            epsilon_spent_by=spent.method,
        )

    async def price(client_id: str, event: PrivacyEvent, plan: bool = False) -> None:
        """The event's curve and PLDs, before the ledger answers (429/503/422 otherwise)."""
        try:
            await pricer.price(client_id, event, plan)
        except PricingRefused as err:
            raise _refused(err) from None
        except BrokenProcessPool:
            raise ApiError(503, "the pricing worker died: retry", {"Retry-After": "1"}) from None
        except Exception as err:  # noqa: BLE001 (whatever pricing raises, it is this event's)
            raise ApiError(422, f"event: cannot be priced: {err}") from None

    @app.get("/health")
    async def health() -> Response:
        """200 only when a write has just been committed (a heartbeat row, with the reports of
        the moment): the ledger can record reports now."""
        try:
            await asyncio.wait_for(asyncio.shield(writer.probe()), HEALTH_TIMEOUT_S)
        except StorageError as err:
            return unavailable(f"the ledger cannot commit: {err}")
        except asyncio.TimeoutError:
            return unavailable(f"the ledger did not commit within {HEALTH_TIMEOUT_S:g} s")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/clients",
        status_code=201,
        dependencies=[Depends(operator)],
        openapi_extra=_body_doc(BudgetIn),
    )
    async def register(request: Request) -> ClientOut:
        body = parse(BudgetIn, await request.body())
        ledger.set_budget(body.client_id, body.epsilon, body.delta, body.method)
        return await client_status(body.client_id)

    @app.get("/v1/clients", dependencies=[Depends(operator)])
    def list_clients() -> list[ClientOut]:
        """Every client, each by the bounds at hand (a PLD not computed yet: RDP, and
        ``epsilon_spent_by`` says so); one client's own status computes its PLD."""
        return [client_out(c) for c in ledger.clients()]

    @app.get("/v1/clients/{client_id}")
    async def read_client(client_id: OwnClient) -> ClientOut:
        return await client_status(client_id)

    @app.post("/v1/clients/{client_id}/plan", openapi_extra=_body_doc(PlanIn))
    async def plan(client_id: OwnClient, request: Request) -> AnswerOut:
        event = parse(PlanIn, await request.body()).event
        async with turn(client_id):
            await price(client_id, event, plan=True)
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
        body = parse(ReportIn, raw_body)
        event = body.event
        key = EventKey(body.run_id, client_id, body.round, body.name)
        async with turn(client_id):
            if not ledger.has(key):  # a repeat is answered from the ledger: nothing to price
                await price(client_id, event)
            committed = writer.submit(key, event)
            ticket = pricer.hold(client_id, event)  # the client's next report sees this one
        try:
            answer = await committed
        except BudgetUnknownError:
            raise ApiError(404, f"unknown client {client_id!r}") from None
        except KeyConflictError as err:
            raise ApiError(409, str(err)) from None
        except StorageQuotaError as err:
            raise ApiError(429, str(err), {"Retry-After": "3600"}) from None
        except StorageError as err:
            metrics.storage_errors.inc()
            raise ApiError(503, str(err), {"Retry-After": "2"}) from None
        except Exception as err:  # noqa: BLE001 (one item's failure is that item's answer)
            raise ApiError(422, f"event: cannot be recorded: {err}") from None
        finally:
            pricer.release(client_id, ticket)
        outcome = "duplicate" if answer.duplicate else "recorded" if answer.accepted else "refused"
        metrics.reports.labels(outcome=outcome).inc()
        if not answer.accepted:
            metrics.refusals.inc()
        metrics.spent(client_id, answer.epsilon_spent, answer.epsilon_budget)
        return _answer_out(answer).model_dump_json().encode()

    @app.post(REPORTS_ROUTE, response_model=AnswerOut, openapi_extra=_body_doc(ReportIn))
    async def report(client_id: ClientPath, request: Request) -> Response:
        """Record an event; idempotent on (run_id, client, round, name). With ``fast_reports``
        (the default) :class:`FastReports` answers this route before FastAPI sees it."""
        answer = await record_report(
            client_id, request.headers.get("authorization", ""), await request.body()
        )
        return Response(answer, media_type="application/json")

    @app.get(REPORTS_ROUTE)
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
        route = next(
            r
            for r in app.routes
            if getattr(r, "path", None) == REPORTS_ROUTE and "POST" in getattr(r, "methods", ())
        )
        served = FastReports(app, record_report, route)
    guarded = RequestGuard(Observe(served, metrics), max_body_bytes)
    guarded.state = app.state  # the ledger, writer, pricer and metrics, as on the FastAPI app
    return guarded
