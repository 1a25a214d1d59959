"""Request and response bodies of the accountant service (validated by pydantic: a value out of
range, a NaN, an unknown event kind or an unknown field is a 422 with a message, never a 500)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from privfed.privacy.events import (
    EVENT_TYPES,
    MAX_CURVE_ORDERS,
    MAX_DIMS,
    MAX_STEPS,
    SIGMA_RANGE,
    PrivacyEvent,
)
from privfed.privacy.rqm_accounting import MAX_ACCOUNTED_LEVELS

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
ClientId = Annotated[str, Field(pattern=ID_PATTERN)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Sigma = Annotated[float, Field(ge=SIGMA_RANGE[0], le=SIGMA_RANGE[1], allow_inf_nan=False)]


class _Strict(BaseModel):
    # strict: a number is a JSON number (not "0.5", not true), an integer a JSON integer (not 1e3)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SampledGaussianIn(_Strict):
    kind: Literal["sampled_gaussian"]
    q: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    sigma: Sigma
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)]


class GaussianIn(_Strict):
    kind: Literal["gaussian"]
    sigma: Sigma
    count: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 1


class RQMIn(_Strict):
    kind: Literal["rqm"]
    c: Positive
    delta: Positive
    m: Annotated[int, Field(ge=2, le=MAX_ACCOUNTED_LEVELS)]
    q: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    sensitivity: Positive
    dims: Annotated[int, Field(ge=1, le=MAX_DIMS)]
    count: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 1


class RdpCurveIn(_Strict):
    kind: Literal["rdp_curve"]
    orders: Annotated[
        list[Annotated[float, Field(gt=1, allow_inf_nan=False)]], Field(max_length=MAX_CURVE_ORDERS)
    ]
    values: Annotated[
        list[Annotated[float, Field(ge=0, allow_inf_nan=False)]], Field(max_length=MAX_CURVE_ORDERS)
    ]


EventIn = Annotated[
    SampledGaussianIn | GaussianIn | RQMIn | RdpCurveIn, Field(discriminator="kind")
]


def to_event(event: EventIn) -> PrivacyEvent:
    """The ledger's event (its own checks run too: ValueError -> 422)."""
    values = {name: value for name, value in event if name != "kind"}
    if event.kind == "rdp_curve":  # the event is immutable: tuples, not lists
        values = {name: tuple(value) for name, value in values.items()}
    return EVENT_TYPES[event.kind](**values)


class BudgetIn(_Strict):
    client_id: ClientId
    epsilon: Positive
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    method: Literal["pld", "rdp"] = "pld"  # the accountant that measures this budget


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
    method: Literal["pld", "rdp"]  # the bound that gave epsilon_after


class ClientOut(_Out):
    client_id: str
    epsilon_budget: Epsilon
    delta: float
    epsilon_spent: Epsilon
    epsilon_remaining: Epsilon
    events: int
    method: Literal["pld", "rdp"]  # the client's accountant: pld (tightest of pld, rdp) or rdp
    epsilon_spent_by: Literal["pld", "rdp"]  # the bound that gave epsilon_spent


class EventOut(BaseModel):
    run_id: str
    round: int
    name: str
    event: dict
