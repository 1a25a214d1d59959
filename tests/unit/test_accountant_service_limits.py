"""The accountant service under hostile or broken input, in process (the real ASGI app over a real
SQLite ledger): events that used to crash it, a poisoned item inside a group commit, storage
faults and truthful health, the pricing limits, one status per fault on every route, and a fuzz
generated from the service's own OpenAPI schema that finds no 5xx."""

from __future__ import annotations

import asyncio
import json
import math

import jsonschema
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfed.privacy.curves import CURVES
from privfed.privacy.events import ORDERS, RQMEvent, SampledGaussianEvent
from privfed.privacy.ledger import Answer, EventKey, Ledger
from privfed.privacy.service.app import create_app
from privfed.privacy.service.auth import TokenStore, add_token
from privfed.privacy.service.client import _answer
from privfed.privacy.service.commit import GroupCommitter
from privfed.privacy.service.pricing import Pricer, PricingRefused

from ..helpers import SmallDisk

SG = {"kind": "sampled_gaussian", "q": 0.1, "sigma": 1.0, "steps": 10}


def rqm(**overrides) -> dict:
    return {
        "kind": "rqm",
        "c": 1.0,
        "delta": 0.25,
        "m": 16,
        "q": 0.5,
        "sensitivity": 0.01,
        "dims": 10,
        **overrides,
    }


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def service(tmp_path):
    tokens_file = tmp_path / "tokens.json"
    op = add_token(tokens_file, "operator", None)
    c0 = add_token(tokens_file, "client", "client-0")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    app = create_app(ledger, TokenStore.load(tokens_file))
    with TestClient(app) as http:
        body = {"client_id": "client-0", "epsilon": 10.0, "delta": 1e-5}
        assert http.post("/v1/clients", json=body, headers=auth(op)).status_code == 201
        yield http, ledger, {"op": op, "c0": c0}, app


def report(http, token, event, rnd=1, client="client-0"):
    body = {"run_id": "run", "round": rnd, "event": event}
    return http.post(f"/v1/clients/{client}/reports", json=body, headers=auth(token))


def plan(http, token, event, client="client-0"):
    return http.post(f"/v1/clients/{client}/plan", json={"event": event}, headers=auth(token))


@pytest.mark.parametrize(
    "event,field",
    [
        ({"kind": "gaussian", "sigma": 1e300}, "sigma"),  # was 500: OverflowError
        ({**SG, "sigma": 1e-300}, "sigma"),  # was 500: ZeroDivisionError
        ({"kind": "rdp_curve", "orders": [1.05, 1.07], "values": [0.1, 0.2]}, "orders"),  # was 500
        (rqm(m=256), "m"),  # was 11,000 x m x m arrays on the event loop: > 15 GiB
        (rqm(delta=1e-300), "delta"),
    ],
)
def test_events_that_crashed_the_service_are_422_naming_the_field(service, event, field):
    http, ledger, tokens, _ = service
    for answer in (report(http, tokens["c0"], event), plan(http, tokens["c0"], event)):
        assert answer.status_code == 422, answer.text
        assert field in answer.json()["detail"]
    assert ledger.count("client-0") == 0


class _FailingEvent(SampledGaussianEvent):
    """Unit-test fake: an event that raises inside the ledger's transaction (what a pricing bug
    or an unforeseen numeric error would do)."""

    def to_json(self) -> str:
        raise OverflowError("injected")


def test_a_poisoned_item_fails_alone_in_its_group_commit(tmp_path):
    """One client's bad report shares a transaction with honest ones: only it fails."""
    ledger = Ledger(tmp_path / "l.sqlite")
    for c in ("honest-0", "honest-1", "poison"):
        ledger.set_budget(c, 100.0, 1e-5)

    async def one_batch():
        writer = GroupCommitter(ledger)
        futures = [
            writer.submit(EventKey("r", "honest-0", 0), SampledGaussianEvent(0.1, 1.0, 1)),
            writer.submit(EventKey("r", "poison", 0), _FailingEvent(0.1, 1.0, 1)),
            writer.submit(EventKey("r", "honest-1", 0), SampledGaussianEvent(0.1, 1.0, 1)),
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        writer.close()
        return results, writer.batches

    (first, poisoned, third), batches = asyncio.run(one_batch())
    assert batches == 1  # the three were one transaction
    assert isinstance(first, Answer) and first.accepted
    assert isinstance(third, Answer) and third.accepted
    assert isinstance(poisoned, OverflowError)
    assert sorted(r[1] for r in ledger.rows()) == ["honest-0", "honest-1"]


def test_a_full_disk_is_503_with_retry_after_and_health_says_why(tmp_path):
    """A real full filesystem under the ledger: reports get 503 with Retry-After, /health says
    why, nothing is recorded; when space returns, both recover without a restart."""
    with SmallDisk(tmp_path / "disk") as disk:
        tokens_file = tmp_path / "tokens.json"
        op, c0 = add_token(tokens_file, "operator", None), add_token(tokens_file, "client", "c")
        ledger = Ledger(disk.path / "ledger.sqlite")
        app = create_app(ledger, TokenStore.load(tokens_file))
        with TestClient(app) as http:
            body = {"client_id": "c", "epsilon": 10.0, "delta": 1e-5}
            assert http.post("/v1/clients", json=body, headers=auth(op)).status_code == 201
            assert http.get("/health").status_code == 200
            with ledger._connect() as con:  # an empty WAL: the next commit must grow it
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            disk.fill()
            r = report(http, c0, SG, client="c")
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
            assert "full" in r.json()["detail"]
            health = http.get("/health")
            assert health.status_code == 503 and "full" in health.json()["detail"]
            assert int(health.headers["retry-after"]) > 0
            disk.free()  # space returns: it recovers on its own
            assert http.get("/health").status_code == 200
            assert report(http, c0, SG, client="c").json()["accepted"]
            assert ledger.count("c") == 1
            metrics = http.get("/metrics").text
            assert 'privfed_accountant_failed_requests_total{status="503"} 2.0' in metrics
            assert "privfed_accountant_storage_errors_total 1.0" in metrics
        ledger.close()


def test_every_route_answers_one_status_per_fault(service):
    http, _, tokens, _ = service
    routes = [
        ("/v1/clients", {"client_id": "client-9", "epsilon": 1.0, "delta": 1e-5}, tokens["op"]),
        ("/v1/clients/client-0/plan", {"event": SG}, tokens["c0"]),
        ("/v1/clients/client-0/reports", {"run_id": "r", "round": 1, "event": SG}, tokens["c0"]),
    ]
    for path, body, token in routes:
        raw = json.dumps(body).encode()

        def chunks(raw=raw):  # chunked transfer: no Content-Length to refuse up front
            yield raw[:-1] + b" " * 70_000
            yield raw[-1:]

        headers = {**auth(token), "content-type": "application/json"}
        big = http.post(path, content=chunks(), headers=headers)
        assert big.status_code == 413, (path, big.text)
        bom = http.post(path, content=b"\xef\xbb\xbf" + raw, headers=headers)
        assert bom.status_code == 422, (path, bom.text)
        two = http.post(
            path,
            content=raw,
            headers=[
                ("authorization", f"Bearer {token}"),
                ("authorization", f"Bearer {token}"),
                ("content-type", "application/json"),
            ],
        )
        assert two.status_code == 400, (path, two.text)
        for kind in ("text/plain", "application/x-www-form-urlencoded", None):
            other = {**auth(token), "content-type": kind} if kind else auth(token)
            plain = http.post(path, content=raw, headers=other)
            assert plain.status_code == 415, (path, kind, plain.text)  # never parsed as JSON
        assert http.post(path, content=raw, headers=headers).status_code in (200, 201)
    two_on_a_get = http.get(
        "/v1/clients/client-0",
        headers=[("authorization", f"Bearer {tokens['c0']}"), ("authorization", "Bearer x")],
    )
    assert two_on_a_get.status_code == 400


def test_epsilon_is_never_negative_and_infinity_is_explicit(service):
    http, _, tokens, _ = service
    body = {"client_id": "client-0", "epsilon": 1.0, "delta": 0.5}
    http.post("/v1/clients", json=body, headers=auth(tokens["op"]))
    weak = report(http, tokens["c0"], {"kind": "gaussian", "sigma": 100.0}).json()
    assert weak["epsilon_spent"] == 0.0  # the bound dips below 0 at delta = 0.5: clamped
    state = http.get("/v1/clients/client-0", headers=auth(tokens["c0"])).json()
    assert state["epsilon_remaining"] == state["epsilon_budget"]
    # RQM keeping every level (q = 1) is deterministic rounding: an unbounded curve.
    unbounded = plan(http, tokens["c0"], rqm(q=1.0))
    assert unbounded.status_code == 200
    assert unbounded.json()["epsilon_after"] == "Infinity"  # JSON has no inf; never null
    assert math.isinf(_answer(unbounded.json()).epsilon_after)


def test_per_client_metrics_only_with_the_flag(tmp_path):
    tokens_file = tmp_path / "tokens.json"
    op = add_token(tokens_file, "operator", None)
    app = create_app(
        Ledger(tmp_path / "l.sqlite"), TokenStore.load(tokens_file), per_client_metrics=True
    )
    with TestClient(app) as http:
        body = {"client_id": "client-7", "epsilon": 1.0, "delta": 1e-5}
        http.post("/v1/clients", json=body, headers=auth(op))
        assert (
            'privfed_accountant_epsilon_spent{client="client-7"} 0.0' in http.get("/metrics").text
        )


def test_pricing_limits_name_themselves_and_a_late_curve_is_kept(tmp_path):
    """Expensive curves (RQM) run in a worker process: one per client at a time (429), a time
    budget (503), and the curve that missed the budget is cached for the retry."""
    ledger = Ledger(tmp_path / "l.sqlite")
    pricer = Pricer(ledger, time_budget_s=1e-4)
    slow = RQMEvent(c=1.0, delta=0.25, m=48, q=0.37, sensitivity=0.0123, dims=5)
    other = RQMEvent(c=1.0, delta=0.25, m=48, q=0.38, sensitivity=0.0123, dims=5)

    async def scenario():
        first = asyncio.ensure_future(pricer.price("client-0", slow))
        await asyncio.sleep(0)
        with pytest.raises(PricingRefused) as second:
            await pricer.price("client-0", other)
        with pytest.raises(PricingRefused) as late:
            await first
        while CURVES.get(slow.to_json()) is None:  # the worker finishes and the curve is kept
            await asyncio.sleep(0.05)
        await pricer.price("client-0", slow)  # the retry: answered from the cache
        return second.value, late.value

    try:
        second, late = asyncio.run(scenario())
    finally:
        pricer.close()
    assert second.status == 429 and "one expensive computation" in second.detail
    assert late.status == 503 and "time budget" in late.detail
    np.testing.assert_allclose(CURVES.get(slow.to_json()), slow.rdp(), rtol=1e-12)


def test_a_restarted_ledger_composes_from_stored_curves_without_computing_any(
    tmp_path, monkeypatch
):
    """10,000 distinct past events: after a restart (a new process: empty caches) the first
    answer reads their curves from the ledger and computes none."""
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.set_budget("c", 1e12, 1e-5)
    events = [SampledGaussianEvent(0.01, 1.0 + i * 1e-4, 10) for i in range(10_000)]
    ledger.report_many([(EventKey("r", "c", i), e) for i, e in enumerate(events)])
    want = ledger.spent("c")
    ledger.close()

    from privfed.privacy import curves

    computed = []
    monkeypatch.setattr(curves, "CURVES", curves.CurveCache())  # a fresh process
    monkeypatch.setattr(
        curves, "_compute", lambda text: computed.append(text) or np.zeros(len(ORDERS))
    )
    assert Ledger(path).spent("c") == pytest.approx(want, rel=1e-12)
    assert computed == []


# -- a fuzz generated from the OpenAPI schema ---------------------------------------------------


def _openapi_bodies(http) -> dict[str, dict]:
    """Each POST route's request body schema, with the components it refers to inlined."""
    schema = http.get("/openapi.json").json()
    components = schema["components"]["schemas"]

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(components[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items() if k != "discriminator"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    bodies = {}
    for path, methods in schema["paths"].items():
        post = methods.get("post")
        if post and "requestBody" in post:
            bodies[path] = inline(post["requestBody"]["content"]["application/json"]["schema"])
    return bodies


def from_schema(node: dict) -> st.SearchStrategy:
    """Values valid by a JSON schema, for the keywords the service's OpenAPI schema uses
    (object, oneOf/anyOf, const, bounded numbers and integers, patterned strings, arrays).
    Written here rather than taken from hypothesis-jsonschema, which breaks with new hypothesis
    releases (its 0.23.1 fails under hypothesis 6.170)."""
    if "const" in node:
        return st.just(node["const"])
    for key in ("oneOf", "anyOf"):
        if key in node:
            return st.one_of([from_schema(option) for option in node[key]])
    kind = node.get("type")
    if kind == "object":
        properties = {k: from_schema(v) for k, v in node.get("properties", {}).items()}
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: v for k, v in properties.items() if k in required},
            optional={k: v for k, v in properties.items() if k not in required},
        )
    if kind == "number":
        return st.floats(
            min_value=node.get("minimum", node.get("exclusiveMinimum")),
            max_value=node.get("maximum", node.get("exclusiveMaximum")),
            exclude_min="exclusiveMinimum" in node,
            exclude_max="exclusiveMaximum" in node,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "integer":
        return st.integers(node.get("minimum"), node.get("maximum"))
    if kind == "string":
        pattern = node.get("pattern")
        return st.from_regex(pattern, fullmatch=True) if pattern else st.text(max_size=20)
    if kind == "array":
        return st.lists(
            from_schema(node.get("items", {})), max_size=min(node.get("maxItems", 8), 80)
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    raise AssertionError(f"a schema keyword this generator does not know: {node}")


@pytest.fixture(scope="module")
def openapi(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    add_token(tmp / "t.json", "operator", None)
    app = create_app(Ledger(tmp / "l.sqlite"), TokenStore.load(tmp / "t.json"))
    with TestClient(app) as http:
        return http.get("/openapi.json").json(), _openapi_bodies(http)


@pytest.fixture(scope="module")
def schema_bodies(openapi):
    return openapi[1]


def conforms(schema: dict, path: str, method: str, response) -> None:
    """The answer is one the schema documents for this route, with the body it says (checked
    by jsonschema against the published components)."""
    documented = schema["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in documented, (path, method, status, response.text)
    content = documented[status].get("content", {}).get("application/json")
    if content is not None:
        root = {**content["schema"], "components": schema["components"]}
        jsonschema.Draft202012Validator(root).validate(response.json())


def test_the_openapi_schema_documents_every_post_body(schema_bodies):
    assert set(schema_bodies) == {
        "/v1/clients",
        "/v1/clients/{client_id}/plan",
        "/v1/clients/{client_id}/reports",
    }


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_schema_fuzz_finds_no_5xx_and_every_answer_is_documented(
    service, openapi, schema_bodies, data
):
    """Bodies valid by the published schema (from_schema above), and the same with one value
    replaced by an arbitrary JSON value: every answer is < 500 (but the time budget's 503,
    with Retry-After, when an extreme event takes longer to price on a loaded machine), is a
    status the schema documents for the route with the body it documents, and a refused body
    changes nothing."""
    http, ledger, tokens, _ = service
    path = data.draw(st.sampled_from(sorted(schema_bodies)))
    body = data.draw(from_schema(schema_bodies[path]))
    if data.draw(st.booleans()) and isinstance(body, dict) and body:
        key = data.draw(st.sampled_from(sorted(body)))
        body[key] = data.draw(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8)
        )
    url = path.replace("{client_id}", "client-0")
    token = tokens["op"] if path == "/v1/clients" else tokens["c0"]
    before = ledger.rows()
    headers = {**auth(token), "content-type": "application/json"}
    r = http.post(url, content=json.dumps(body), headers=headers)
    if r.status_code == 503:  # the documented time budget: an extreme RQM event, a busy machine
        assert "time budget" in r.json()["detail"] and "retry-after" in r.headers, r.text
    else:
        assert r.status_code < 500, (path, body, r.text)
    conforms(openapi[0], path, "post", r)
    if r.status_code >= 400:
        assert ledger.rows() == before
    if path != "/v1/clients":  # the reads answer as documented too
        read = data.draw(
            st.sampled_from(["/v1/clients/{client_id}", "/v1/clients/{client_id}/reports"])
        )
        params = {"round": data.draw(st.integers(-3, 3) | st.text(max_size=3))}
        got = http.get(read.replace("{client_id}", "client-0"), params=params, headers=headers)
        conforms(openapi[0], read, "get", got)


def test_infinity_and_errors_are_as_documented(service, openapi):
    http, _, tokens, _ = service
    body = {
        "event": {
            "kind": "rqm",
            "c": 1.0,
            "delta": 0.5,
            "m": 8,
            "q": 1.0,
            "sensitivity": 0.01,
            "dims": 5,
        }
    }
    unbounded = http.post("/v1/clients/client-0/plan", json=body, headers=auth(tokens["c0"]))
    assert unbounded.json()["epsilon_after"] == "Infinity"
    conforms(openapi[0], "/v1/clients/{client_id}/plan", "post", unbounded)
    for r, path, method in (
        (
            http.get("/v1/clients/nobody", headers=auth(tokens["op"])),
            "/v1/clients/{client_id}",
            "get",
        ),
        (
            http.post("/v1/clients/client-0/plan", json={}, headers=auth(tokens["c0"])),
            "/v1/clients/{client_id}/plan",
            "post",
        ),
        (http.get("/v1/clients", headers=auth(tokens["c0"])), "/v1/clients", "get"),
    ):
        assert r.status_code in (403, 404, 422) and isinstance(r.json()["detail"], str)
        conforms(openapi[0], path, method, r)
    report(http, tokens["c0"], SG)
    conflict = report(http, tokens["c0"], {**SG, "sigma": 2.0})
    assert conflict.status_code == 409
    conforms(openapi[0], "/v1/clients/{client_id}/reports", "post", conflict)


@pytest.mark.parametrize(
    "field, value",
    [
        ("q", "0.5"),  # a string where a number goes
        ("q", True),  # a boolean is not 1.0
        ("round", True),
        ("round", 1e3),  # an integer is a JSON integer
        ("round", "3"),
        ("steps", 2.0),
    ],
)
def test_numbers_are_json_numbers(service, field, value):
    http, ledger, tokens, _ = service
    event = {**SG, field: value} if field != "round" else SG
    body = {"run_id": "r", "round": value if field == "round" else 1, "event": event}
    r = http.post("/v1/clients/client-0/reports", json=body, headers=auth(tokens["c0"]))
    assert r.status_code == 422 and field in r.json()["detail"], r.text
    assert ledger.count("client-0") == 0
