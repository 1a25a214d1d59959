"""Plain ASGI middlewares of the accountant service (Starlette's BaseHTTPMiddleware costs more
per request than the ledger's own work):

* :class:`RequestGuard`, outermost: reads the whole body before any route sees it and refuses
  one over the limit with 413, declared or streamed, on every route; refuses a request with
  more than one ``Authorization`` header with 400 (routes must not disagree on which one
  counts), and a body that does not say it is JSON with 415 (a form or text is not parsed as
  JSON);
* :class:`Observe`: latency per route and 4xx/5xx counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from privfed.privacy.service.metrics import ServiceMetrics


async def send_json(
    send: Send, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _is_json(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    types = [value for name, value in headers if name == b"content-type"]
    return len(types) == 1 and types[0].split(b";")[0].strip().lower() == b"application/json"


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes
        self.state: object = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        if sum(name == b"authorization" for name, _ in headers) > 1:
            await send_json(send, 400, "more than one Authorization header")
            return
        if scope["method"] in ("POST", "PUT", "PATCH") and not _is_json(headers):
            await send_json(send, 415, "Content-Type must be application/json")
            return
        declared = dict(headers).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await send_json(send, 413, f"request body over {self.limit} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_json(send, 413, f"request body over {self.limit} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        scope.setdefault("state", {})["body"] = body
        await self.app(scope, replay, send)


class Observe:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._latency: dict[str, Any] = {}

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
            elif status >= 500:
                self.metrics.failed.labels(status=str(status)).inc()
