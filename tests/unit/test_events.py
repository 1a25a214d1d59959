"""Each event is specified once (privacy/events.py), and accountants are registered by name.

The library, the ledger's parser and the accountant service's request schema read the same
classes, so they accept and refuse the same events; each accountant says which events it can
account, and the ledger refuses the rest."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from privfed.privacy import accountant as accountants
from privfed.privacy import pld
from privfed.privacy.events import (
    EVENT_TYPES,
    SIGMA_RANGE,
    GaussianEvent,
    RdpCurveEvent,
    RQMEvent,
    SampledGaussianEvent,
    event_from_json,
)
from privfed.privacy.ledger import EventKey, KeyConflictError, Ledger
from privfed.privacy.service.pricing import pool_of
from privfed.privacy.service.schemas import BudgetIn, PlanIn

numbers = (
    st.floats(allow_nan=False)
    | st.integers(-(10**12), 10**12)
    | st.sampled_from([0, 1, 2, 64, 65, 1e-10, 1e10, 1.0000001e10, 10**7, 10**7 + 1, 10**10])
)
event_like = st.fixed_dictionaries(
    {"kind": st.sampled_from([*EVENT_TYPES, "laplace"])},
    optional={
        k: numbers | st.text(max_size=3) | st.booleans()
        for k in (
            *("q", "sigma", "steps", "count", "c", "delta", "m", "sensitivity", "dims"),
            *("clip", "gamma", "devices", "dim", "beta"),
        )
    },
)


def _library(body: dict) -> object:
    try:
        return event_from_json(json.dumps(body))
    except ValueError:  # pydantic's ValidationError is one
        return "refused"


def _service(body: dict) -> object:
    try:
        return PlanIn.model_validate_json(json.dumps({"event": body})).event
    except ValidationError:
        return "refused"


@settings(max_examples=400, deadline=None)
@given(body=event_like)
def test_the_service_accepts_exactly_the_events_the_library_does(body):
    """The same body is the same event, or refused by both: one definition, no second schema
    whose ranges could drift from the library's."""
    assert _service(body) == _library(body)


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "gaussian", "sigma": SIGMA_RANGE[0]},
        {"kind": "gaussian", "sigma": SIGMA_RANGE[1]},
        {"kind": "sampled_gaussian", "q": 1, "sigma": 1.0, "steps": 10**7},
        {"kind": "rqm", "c": 1.0, "delta": 0.5, "m": 64, "q": 0.5, "sensitivity": 0.1, "dims": 3},
        {"kind": "rdp_curve", "orders": [2.0, 1.05], "values": [0.5, 0.1]},
        {
            "kind": "distributed_discrete_gaussian",
            **{"q": 1, "clip": 1e10, "gamma": 1e-10, "sigma": 1e-10, "devices": 10**6},
            **{"dim": 10**10, "beta": 0.0, "count": 10**7},
        },
    ],
)
def test_events_at_their_bounds_are_accepted_by_both(body):
    event = _library(body)
    assert event != "refused" and _service(body) == event
    assert event_from_json(event.to_json()) == event  # what the ledger stores parses back


def test_the_service_schema_is_the_events_definition():
    """The OpenAPI schema shows each event class with its ranges, as events.py defines them."""
    schema = PlanIn.model_json_schema()
    defs = schema["$defs"]
    assert {cls.__name__ for cls in EVENT_TYPES.values()} <= set(defs)
    sigma = defs["GaussianEvent"]["properties"]["sigma"]
    assert (sigma["minimum"], sigma["maximum"]) == SIGMA_RANGE
    mapping = schema["properties"]["event"]["discriminator"]["mapping"]
    assert set(mapping) == set(EVENT_TYPES)


def test_pld_and_pricing_read_what_each_event_declares():
    """No isinstance chain: an event says whether it is a Gaussian composition (PLD) and how
    long its curve takes (the service's pool)."""
    sg = SampledGaussianEvent(q=0.1, sigma=1.0, steps=3)
    rqm = RQMEvent(c=1.0, delta=0.5, m=4, q=0.5, sensitivity=0.1, dims=3)
    curve = RdpCurveEvent(orders=(2.0,), values=(0.1,))
    assert pld.supports(sg) and pld.supports(GaussianEvent(sigma=2.0))
    assert not pld.supports(SampledGaussianEvent(q=0.1, sigma=pld.MIN_SIGMA / 2, steps=1))
    assert not pld.supports(rqm) and not pld.supports(curve)
    assert [pool_of(e) for e in (sg, GaussianEvent(sigma=1.0), curve, rqm)] == [
        "fast",
        None,
        None,
        "slow",
    ]
    # a plain Gaussian composes exactly (mu^2 = count / sigma^2), like a q = 1 sampled one
    assert pld.composition_of([(GaussianEvent(sigma=2.0, count=3), 1)]) == pld.composition_of(
        [(SampledGaussianEvent(q=1.0, sigma=2.0, steps=3), 1)]
    )


class _GaussianOnlyAccountant(accountants.RdpAccountant):
    """Test fake: a registered accountant that accounts unsampled Gaussian events only."""

    name = "gaussian_only"

    def supports(self, event) -> bool:
        return isinstance(event, GaussianEvent)


@pytest.fixture
def gaussian_only():
    accountants.register_accountant(_GaussianOnlyAccountant())
    yield "gaussian_only"
    accountants.ACCOUNTANTS.pop("gaussian_only")


def test_a_registered_accountant_measures_budgets_and_refuses_what_it_cannot_account(
    tmp_path, gaussian_only
):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.set_budget("c", 10.0, 1e-5, method=gaussian_only)
    assert BudgetIn(client_id="c", epsilon=1.0, delta=1e-5, method=gaussian_only)
    answer = ledger.report(EventKey("run", "c", 0), GaussianEvent(sigma=2.0))
    assert answer.accepted and answer.epsilon_spent == pytest.approx(
        accountants.epsilon([GaussianEvent(sigma=2.0)], 1e-5, "rdp"), rel=1e-12
    )
    sampled = SampledGaussianEvent(q=0.1, sigma=1.0, steps=1)
    message = "the gaussian_only accountant cannot account 'sampled_gaussian' events"
    with pytest.raises(ValueError, match=message):
        ledger.report(EventKey("run", "c", 1), sampled)
    with pytest.raises(ValueError, match=message):
        ledger.plan("c", sampled)
    with pytest.raises(ValueError, match=message):
        accountants.spent([sampled], 1e-5, gaussian_only)
    assert ledger.count("c") == 1


def test_an_unregistered_method_is_refused_everywhere(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    with pytest.raises(ValueError, match=r"must be a registered accountant \(pld, rdp\)"):
        ledger.set_budget("c", 1.0, 1e-5, method="moments")
    with pytest.raises(ValidationError, match="must be a registered accountant"):
        BudgetIn(client_id="c", epsilon=1.0, delta=1e-5, method="moments")
    with pytest.raises(ValueError, match="must be a registered accountant"):
        accountants.epsilon([GaussianEvent(sigma=1.0)], 1e-5, "moments")


def test_a_repeat_matches_an_event_stored_with_another_number_spelling(tmp_path):
    """A ledger written before events were validated models may hold ``"sigma": 2`` where one
    now writes ``2.0``: the same event, so a repeat is a duplicate, not a key conflict."""
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.set_budget("c", 10.0, 1e-5)
    key = EventKey("run", "c", 0)
    first = ledger.report(key, GaussianEvent(sigma=2.0))
    with sqlite3.connect(path) as con:
        con.execute(
            "UPDATE events SET event = ?", ('{"count": 1, "kind": "gaussian", "sigma": 2}',)
        )
    again = Ledger(path).report(key, GaussianEvent(sigma=2.0))
    assert again.duplicate and again.epsilon_spent == first.epsilon_spent
    with pytest.raises(KeyConflictError):
        Ledger(path).report(key, GaussianEvent(sigma=3.0))
