"""How the accountant service reads a request: who is calling (bearer tokens), whether they may
touch a client id, and one body parser for every route. Shared by the FastAPI routes and the
fast report path (fast_reports.py), so that both answer the same way."""

from __future__ import annotations

import json
from typing import Annotated, TypeVar

from fastapi import Depends, Path, Request
from pydantic import BaseModel, ValidationError

from privfed.config import one_line
from privfed.privacy.service.auth import Principal, TokenStore
from privfed.privacy.service.schemas import ID_PATTERN

ClientPath = Annotated[str, Path(pattern=ID_PATTERN)]
Body = TypeVar("Body", bound=BaseModel)


class ApiError(Exception):
    """A 4xx/5xx answer with a message, raised by code that both request paths share."""

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


def parse(model: type[Body], raw: bytes) -> Body:
    """Every route's body parser (one JSON dialect for all: pydantic's strict parser)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise ApiError(422, one_line(err, "body.")) from None


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
