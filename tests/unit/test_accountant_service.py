"""The accountant service's API in process (FastAPI's TestClient drives the real ASGI app over the
real SQLite ledger): authentication, validation, idempotency, the same answers as the embedded
ledger, and a property-based fuzz that finds no 5xx and no ledger change from rejected requests."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privfed.privacy.curves import CURVES
from privfed.privacy.events import GaussianEvent, RQMEvent, SampledGaussianEvent
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.service.app import create_app
from privfed.privacy.service.auth import TokenStore, add_token, hash_token

SG = {"kind": "sampled_gaussian", "q": 0.1, "sigma": 1.0, "steps": 10}


@pytest.fixture(params=[True, False], ids=["fast-reports", "fastapi-reports"])
def service(tmp_path, request):
    """The service with the report route's fast path on and off: both must answer alike."""
    tokens_file = tmp_path / "tokens.json"
    op = add_token(tokens_file, "operator", None)
    c0 = add_token(tokens_file, "client", "client-0")
    c1 = add_token(tokens_file, "client", "client-1")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    app = create_app(ledger, TokenStore.load(tokens_file), fast_reports=request.param)
    with TestClient(app) as http:
        for c in ("client-0", "client-1"):
            r = http.post(
                "/v1/clients",
                json={"client_id": c, "epsilon": 10.0, "delta": 1e-5},
                headers=auth(op),
            )
            assert r.status_code == 201
        yield http, ledger, {"op": op, "c0": c0, "c1": c1}, tokens_file


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def report(http, token, client="client-0", rnd=1, event=SG, run="run"):
    body = {"run_id": run, "round": rnd, "event": event}
    return http.post(f"/v1/clients/{client}/reports", json=body, headers=auth(token))


def test_tokens_are_stored_hashed_only(service):
    _, _, tokens, tokens_file = service
    text = tokens_file.read_text()
    for token in tokens.values():
        assert token not in text and hash_token(token) in text
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"


def test_a_report_is_recorded_once_and_a_repeat_returns_the_first_answer(service):
    http, ledger, tokens, _ = service
    first = report(http, tokens["c0"])
    assert first.status_code == 200 and first.json()["accepted"] and not first.json()["duplicate"]
    again = report(http, tokens["c0"])
    assert (
        again.json()["duplicate"] and again.json()["epsilon_spent"] == first.json()["epsilon_spent"]
    )
    assert ledger.count("client-0") == 1
    other = report(http, tokens["c0"], event={**SG, "sigma": 2.0})  # same key, other event
    assert other.status_code == 409 and ledger.count("client-0") == 1


def test_answers_equal_the_embedded_ledger(service, tmp_path):
    http, _, tokens, _ = service
    embedded = Ledger(tmp_path / "embedded.sqlite")
    embedded.set_budget("client-0", 10.0, 1e-5)
    events = [
        SampledGaussianEvent(0.1, 1.0, 10),
        GaussianEvent(4.0),
        RQMEvent(c=1.0, delta=0.5, m=8, q=0.5, sensitivity=0.01, dims=5),
        SampledGaussianEvent(0.1, 1.0, 10),
    ]
    for rnd, ev in enumerate(events, start=1):
        got = report(http, tokens["c0"], rnd=rnd, event=json.loads(ev.to_json())).json()
        want = embedded.report(EventKey("run", "client-0", rnd), ev)
        assert got == want.__dict__
    plan = http.post(
        "/v1/clients/client-0/plan", json={"event": SG}, headers=auth(tokens["c0"])
    ).json()
    assert plan == embedded.plan("client-0", SampledGaussianEvent(0.1, 1.0, 10)).__dict__
    status = http.get("/v1/clients/client-0", headers=auth(tokens["c0"])).json()
    assert status["epsilon_spent"] == pytest.approx(embedded.spent("client-0"), rel=1e-12)
    assert status["epsilon_remaining"] == pytest.approx(10.0 - embedded.spent("client-0"))
    assert status["events"] == 4


def test_a_report_over_budget_is_refused_and_changes_nothing(service):
    http, ledger, tokens, _ = service
    big = {"kind": "gaussian", "sigma": 0.2, "count": 1}
    r = report(http, tokens["c0"], event=big)
    assert r.status_code == 200 and not r.json()["accepted"]
    assert r.json()["method"] == "pld"  # the tight bound refused it: RDP would have as well
    assert ledger.count("client-0") == 0


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        (None, "get", "/v1/clients/client-0", 401),
        ("nonsense", "get", "/v1/clients/client-0", 401),
        ("c0", "get", "/v1/clients/client-1", 403),
        ("c0", "post", "/v1/clients/client-1/reports", 403),
        ("c0", "get", "/v1/clients", 403),
        ("c0", "post", "/v1/clients", 403),
        ("c1", "get", "/v1/clients/client-1/reports", 200),
        ("op", "get", "/v1/clients", 200),
        ("op", "get", "/v1/clients/client-1", 200),
    ],
)
def test_tokens_read_and_report_only_their_own_client(service, who, method, path, status):
    http, ledger, tokens, _ = service
    headers = {} if who is None else auth(tokens.get(who, who))
    body = (
        {"run_id": "r", "round": 1, "event": SG}
        if path.endswith("reports")
        else {"client_id": "client-9", "epsilon": 1.0, "delta": 1e-5}
    )
    r = getattr(http, method)(path, headers=headers, **({"json": body} if method == "post" else {}))
    assert r.status_code == status, r.text
    if status >= 400:
        assert set(r.json()) == {"detail"} and "epsilon" not in r.text  # never data
        assert ledger.count("client-1") == 0 and "client-9" not in ledger.clients()


@pytest.mark.parametrize(
    "event",
    [
        {**SG, "sigma": -1.0},
        {**SG, "q": 0.0},
        {**SG, "q": 1.5},
        {**SG, "steps": 10**12},
        {**SG, "steps": 0},
        {"kind": "laplace", "b": 1.0},
        {**SG, "extra": 1},
        {"kind": "rdp_curve", "orders": [1.05], "values": [1.0]},  # gives no accountant order
        {"kind": "rqm", "c": 1.0, "delta": 0.5, "m": 1, "q": 0.5, "sensitivity": 0.1, "dims": 3},
    ],
)
def test_invalid_events_are_4xx_with_a_message_and_change_nothing(service, event):
    http, ledger, tokens, _ = service
    r = report(http, tokens["c0"], event=event)
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    assert ledger.count("client-0") == 0


def test_nan_malformed_json_and_oversized_bodies_are_refused(service):
    http, ledger, tokens, _ = service
    headers = {**auth(tokens["c0"]), "content-type": "application/json"}
    nan = '{"run_id": "r", "round": 1, "event": {"kind": "gaussian", "sigma": NaN}}'
    for body, status in ((nan, 422), ("{not json", 422), ("[]", 422), ("x" * 70_000, 413)):
        r = http.post("/v1/clients/client-0/reports", content=body, headers=headers)
        assert r.status_code == status, (body[:20], r.text)
    assert ledger.count("client-0") == 0


def test_health_metrics_and_openapi(service):
    http, _, tokens, _ = service
    report(http, tokens["c0"])
    report(http, tokens["c0"])
    assert http.get("/health").json() == {"status": "ok"}
    text = http.get("/metrics").text
    assert 'privfed_accountant_reports_total{outcome="recorded"} 1.0' in text
    assert 'privfed_accountant_reports_total{outcome="duplicate"} 1.0' in text
    # Without a token /metrics shows aggregates only: no client ids, no per-client epsilon.
    assert "client-0" not in text and "privfed_accountant_epsilon_spent{" not in text
    spent = http.get("/v1/clients/client-0", headers=auth(tokens["c0"])).json()["epsilon_spent"]
    assert f"privfed_accountant_epsilon_spent_max {spent!r}" in text
    assert (
        'privfed_accountant_request_seconds_count{route="/v1/clients/{client_id}/reports"} 2.0'
        in text
    )
    schema = http.get("/openapi.json").json()
    post = schema["paths"]["/v1/clients/{client_id}/reports"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert body["required"] == ["run_id", "round", "event"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AnswerOut"
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
event_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["sampled_gaussian", "gaussian", "rqm", "rdp_curve", "x"])},
    optional={
        k: json_values | st.floats() | st.integers(-(10**15), 10**15)
        for k in ("q", "sigma", "steps", "count", "c", "delta", "m", "sensitivity", "dims")
    },
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "run_id": st.text(max_size=140) | json_values,
            "round": st.integers(-5, 10**10) | json_values,
            "event": event_like | json_values,
        },
        optional={"name": st.text(max_size=20)},
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=bodies,
    path=st.sampled_from(["reports", "plan"]),
    client=st.sampled_from(["client-0", "client-1", "../x", "client-0%00"]),
)
def test_fuzz_no_5xx_and_rejected_requests_change_nothing(service, body, path, client):
    http, ledger, tokens, _ = service
    before = ledger.rows()
    headers = {**auth(tokens["c0"]), "content-type": "application/json"}
    content = json.dumps(body)  # NaN and Infinity tokens reach the server as such
    r = http.post(f"/v1/clients/{client}/{path}", content=content, headers=headers)
    assert r.status_code < 500, r.text
    if r.status_code >= 400 or path == "plan" or not r.json().get("accepted"):
        assert ledger.rows() == before


def test_a_new_pld_is_computed_in_the_pricing_worker_never_in_the_commit(tmp_path, monkeypatch):
    """Each round of a real run is a new composition (its PLD costs 10 ms to 1 s): the pricer
    computes it in its worker process before the group commit, so that the commit, which holds
    every other client's report, only finds it in the cache."""
    tokens_file = tmp_path / "tokens.json"
    tokens = {"op": add_token(tokens_file, "operator", None)}
    tokens["c0"] = add_token(tokens_file, "client", "client-0")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    # a generous pricing budget: a worker that starts slowly on a busy machine is waited for
    app = create_app(ledger, TokenStore.load(tokens_file), pricing_budget_s=120.0, pld_wait_s=120.0)
    with TestClient(app) as http:
        body = {"client_id": "client-0", "epsilon": 10.0, "delta": 1e-5}
        assert http.post("/v1/clients", json=body, headers=auth(tokens["op"])).status_code == 201
        _pld_in_the_worker(http, tokens, monkeypatch)


def _pld_in_the_worker(http, tokens, monkeypatch) -> None:
    from privfed.privacy import pld

    def in_this_process(*_):  # a fake standing in for the computation, named as such
        raise AssertionError("a PLD was computed in the service process")

    monkeypatch.setattr(pld, "compute_epsilon", in_this_process)
    event = {"kind": "sampled_gaussian", "q": 0.31, "sigma": 1.37, "steps": 2}
    answers = [report(http, tokens["c0"], rnd=r, event=event).json() for r in range(1, 4)]
    assert [a["method"] for a in answers] == ["pld"] * 3
    want = [pld.EPSILONS.get(pld.Composition(((0.31, 1.37, 2 * r),)), 1e-5) for r in range(1, 4)]
    assert [a["epsilon_after"] for a in answers] == want
    status = http.get("/v1/clients/client-0", headers=auth(tokens["c0"])).json()
    assert status["method"] == "pld" and status["epsilon_spent_by"] == "pld"
    assert status["epsilon_spent"] == answers[-1]["epsilon_after"]


def test_a_budget_measured_by_rdp_says_so(service):
    http, ledger, tokens, _ = service
    body = {"client_id": "client-1", "epsilon": 10.0, "delta": 1e-5, "method": "rdp"}
    assert http.post("/v1/clients", json=body, headers=auth(tokens["op"])).status_code == 201
    answer = report(http, tokens["c1"], client="client-1").json()
    assert answer["method"] == "rdp"
    assert answer["epsilon_after"] == pytest.approx(ledger.spent_by("client-1").epsilon, rel=1e-12)
    body["method"] = "moments"
    assert http.post("/v1/clients", json=body, headers=auth(tokens["op"])).status_code == 422


@pytest.mark.parametrize(
    "limits",
    [{"pricing_budget_s": 1e-3}, {"pld_wait_s": 1e-3}],  # the 10 s budget stays for RQM curves
    ids=["time-budget", "pld-wait"],
)
def test_a_pld_not_ready_in_time_leaves_the_decision_to_rdp_and_is_counted(tmp_path, limits):
    """The pricer's pool is busy or cold (here: a wait no computation meets): the report is not
    held, it is decided by RDP (a valid bound), and /metrics counts it."""
    from privfed.privacy.accountant import epsilon

    tokens_file = tmp_path / "tokens.json"
    op = add_token(tokens_file, "operator", None)
    c0 = add_token(tokens_file, "client", "client-0")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    app = create_app(ledger, TokenStore.load(tokens_file), **limits)
    # An event of its own per case (a PLD that one case started is cached when it ends)
    q = 0.29 if "pricing_budget_s" in limits else 0.28
    event = {"kind": "sampled_gaussian", "q": q, "sigma": 1.41, "steps": 3}
    # The event's curve is known (a 1 ms budget would refuse its computation: a 503)
    CURVES.curve(SampledGaussianEvent(q, 1.41, 3).to_json())
    with TestClient(app) as http:
        body = {"client_id": "client-0", "epsilon": 10.0, "delta": 1e-5}
        assert http.post("/v1/clients", json=body, headers=auth(op)).status_code == 201
        answer = report(http, c0, event=event).json()
        assert answer["accepted"] and answer["method"] == "rdp"
        by_rdp = epsilon([SampledGaussianEvent(q, 1.41, 3)], 1e-5, "rdp")
        assert answer["epsilon_after"] == pytest.approx(by_rdp, rel=1e-12)
        text = http.get("/metrics").text
        assert "privfed_accountant_pld_deferred_total 1.0" in text
    assert ledger.count("client-0") == 1


def test_the_next_rounds_pld_is_computed_ahead_in_the_worker(tmp_path, monkeypatch):
    """A run reports the same event every round, so after pricing round r the service starts
    round r + 1's composition in its worker: when that report comes, its PLD is ready (the
    report does not wait for it), and it was never computed in the service process."""
    from privfed.privacy import pld

    tokens_file = tmp_path / "tokens.json"
    op = add_token(tokens_file, "operator", None)
    c0 = add_token(tokens_file, "client", "client-0")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    app = create_app(ledger, TokenStore.load(tokens_file), pricing_budget_s=120.0, pld_wait_s=120.0)

    def in_this_process(*_):  # a fake standing in for the computation, named as such
        raise AssertionError("a PLD was computed in the service process")

    event = {"kind": "sampled_gaussian", "q": 0.27, "sigma": 1.43, "steps": 2}
    ahead = pld.Composition(((0.27, 1.43, 4),))
    with TestClient(app) as http:
        body = {"client_id": "client-0", "epsilon": 10.0, "delta": 1e-5}
        assert http.post("/v1/clients", json=body, headers=auth(op)).status_code == 201
        monkeypatch.setattr(pld, "compute_epsilon", in_this_process)
        assert pld.EPSILONS.get(ahead, 1e-5) is None
        assert report(http, c0, rnd=1, event=event).json()["method"] == "pld"
        deadline = time.monotonic() + 60
        while pld.EPSILONS.get(ahead, 1e-5) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ledger.pld_needed("client-0", SampledGaussianEvent(0.27, 1.43, 2)) is None
        second = report(http, c0, rnd=2, event=event).json()
    assert second["method"] == "pld"
    assert second["epsilon_after"] == pld.EPSILONS.get(ahead, 1e-5)


def test_a_forecast_made_stale_by_another_process_never_gives_a_wrong_answer(tmp_path):
    """The pricer forecasts a client's composition from this process's last commit. Another
    process's commit makes that forecast one report behind: the PLD computed ahead is then for
    the wrong composition, and the report is decided by RDP over the events really recorded
    (a valid bound), never by the stale composition's PLD."""
    from privfed.privacy import pld
    from privfed.privacy.accountant import epsilon

    path = tmp_path / "ledger.sqlite"
    service, other = Ledger(path), Ledger(path)
    service.computes_pld = other.computes_pld = False  # as in the service
    service.set_budget("c", 50.0, 1e-5)
    event = SampledGaussianEvent(0.23, 1.47, 1)
    service.report(EventKey("run", "c", 1), event)
    other.report(EventKey("run", "c", 2), event)  # the service did not see this one
    stale, delta = service.pld_needed("c", event)
    assert stale == pld.Composition(((0.23, 1.47, 2),))  # one behind: 3 steps after this report
    pld.EPSILONS.epsilon(stale, delta)  # the pricer computes the forecast's PLD
    answer = service.report(EventKey("run", "c", 3), event)
    assert answer.method == "rdp"
    assert answer.epsilon_after == pytest.approx(epsilon([event] * 3, 1e-5, "rdp"), rel=1e-12)


def test_the_forecast_keeps_a_bounded_number_of_clients_and_reads_the_rest(tmp_path):
    """The committed totals are an LRU (memory stays bounded with many clients): a client that
    fell out of it is forecast from its recorded events instead, with the same result."""
    from privfed.privacy import pld

    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.computes_pld = False
    ledger.COMMITTED_CLIENTS = 2
    event = SampledGaussianEvent(0.21, 1.49, 1)
    for c in ("a", "b", "c"):
        ledger.set_budget(c, 50.0, 1e-5)
        ledger.report(EventKey("run", c, 1), event)
    assert list(ledger._committed) == ["b", "c"]  # noqa: SLF001
    for c in ("a", "b", "c"):
        assert ledger.pld_needed(c, event) == (pld.Composition(((0.21, 1.49, 2),)), 1e-5)
