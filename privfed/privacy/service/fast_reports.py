"""The accountant service's hot route, ``POST /v1/clients/{id}/reports``, as plain ASGI."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from privfed.privacy.service.requests import ApiError
from privfed.privacy.service.schemas import ID_PATTERN

REPORTS_ROUTE = "/v1/clients/{client_id}/reports"
REPORTS_PATH = re.compile(r"/v1/clients/(" + ID_PATTERN.strip("^$") + r")/reports")


class FastReports:
    """ASGI: ``POST /v1/clients/{id}/reports``, the one hot route, answered without FastAPI's
    routing, dependency and response machinery, which cost ~250 µs a report, more than the
    ledger's own work. It runs the same ``record_report`` as the FastAPI route (which documents
    it in the OpenAPI schema and serves it when this is off; the tests run both), so checks,
    errors and answers are the same. Any other request, or a client id outside the pattern
    (FastAPI answers its 422), passes through. RequestGuard has already read the body."""

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
        authorization = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
        headers = [(b"content-type", b"application/json")]
        try:
            body = await self.record_report(
                match.group(1), authorization.decode("latin-1"), scope["state"]["body"]
            )
            status = 200
        except ApiError as err:
            status, body = err.status, err.body()
            headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
