"""Request and response bodies of the accountant service (validated by pydantic: a value out of
range, a NaN, an unknown event kind or an unknown field is a 422 with a message, never a 500)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from privfed.privacy.accountant import MethodName
from privfed.privacy.events import AnyEvent

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
ClientId = Annotated[str, Field(pattern=ID_PATTERN)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    # strict: a number is a JSON number (not "0.5", not true), an integer a JSON integer (not 1e3)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# An event in a request body is the library's own event class (privacy/events.py), chosen by
# its "kind": its fields, ranges and checks are defined there once, and a body that fails them
# is a 422 saying which field and why.
EventIn = AnyEvent


class BudgetIn(_Strict):
    client_id: ClientId
    epsilon: Positive
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    method: MethodName = "pld"  # the accountant that measures this budget (a registered one)


class PlanIn(_Strict):
    event: EventIn


class ReportIn(_Strict):
    """One report; (run_id, client, round, name) is its idempotency key."""

    run_id: ClientId
    round: Annotated[int, Field(ge=0, le=10**9)]
    name: Annotated[str, Field(pattern=ID_PATTERN)] = "dp_sgd"
    event: EventIn


class _Out(BaseModel):
    # JSON has no infinity: an unbounded epsilon is written as "Infinity", never as null.
    model_config = ConfigDict(ser_json_inf_nan="strings")


# An epsilon as the answers write it: a number, or "Infinity" (unbounded), as the schema says
Epsilon = Annotated[
    float,
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"const": "Infinity"}]}),
]


class AnswerOut(_Out):
    accepted: bool
    duplicate: bool
    epsilon_spent: Epsilon
    epsilon_after: Epsilon
    epsilon_budget: Epsilon
    delta: float
    method: str  # the bound that gave epsilon_after


class ClientOut(_Out):
    client_id: str
    epsilon_budget: Epsilon
    delta: float
    epsilon_spent: Epsilon
    epsilon_remaining: Epsilon
    events: int
    method: str  # the client's accountant (privacy/accountant.py ACCOUNTANTS)
    epsilon_spent_by: str  # the bound that gave epsilon_spent


class EventOut(BaseModel):
    run_id: str
    round: int
    name: str
    event: dict
