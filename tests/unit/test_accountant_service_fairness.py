"""The accountant service's promises under pressure (issue 31), in process over the real SQLite
ledger and the real pricing workers: a repeat returns the first answer (also after a restart,
when a new computation would give another bound), concurrent reports of one client are decided
by PLD as the composition they commit to, and a client's quotas (stored bytes, worker seconds)
refuse it with 429 and Retry-After before it can fill the disk or the pools."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from fastapi.testclient import TestClient

from privfed.privacy import pld
from privfed.privacy.accountant import epsilon
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.service.app import create_app
from privfed.privacy.service.auth import TokenStore, add_token
from privfed.privacy.service.pricing import WorkQuota


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _service(tmp_path, **kwargs):
    tokens_file = tmp_path / "tokens.json"
    tokens = {"op": add_token(tokens_file, "operator", None)}
    tokens["c0"] = add_token(tokens_file, "client", "client-0")
    tokens["c1"] = add_token(tokens_file, "client", "client-1")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    app = create_app(ledger, TokenStore.load(tokens_file), **kwargs)
    return app, ledger, tokens


def _register(http, tokens, client: str, budget: float) -> None:
    body = {"client_id": client, "epsilon": budget, "delta": 1e-5}
    assert http.post("/v1/clients", json=body, headers=auth(tokens["op"])).status_code == 201


def _pld_by_dp_accounting(event: SampledGaussianEvent, times: int) -> float:
    """Google's PLD accountant, independent of privfed's code and caches."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    gaussian = dp_event.GaussianDpEvent(event.sigma)
    sampled = dp_event.PoissonSampledDpEvent(event.q, gaussian)
    accountant.compose(dp_event.SelfComposedDpEvent(sampled, event.steps * times))
    return accountant.get_epsilon(1e-5)


def test_a_repeat_returns_the_first_answer_even_after_a_restart(tmp_path):
    """The first answer is stored with the event: after a restart (no PLD cached, and the
    service never computes one in its commit) a repeat still gets the same floats and the same
    bound, where recomputing would have answered by RDP (the issue's 92.47 then 87.83)."""
    app, ledger, tokens = _service(tmp_path, pld_wait_s=120.0, pricing_budget_s=120.0)
    event = {"kind": "sampled_gaussian", "q": 0.33, "sigma": 1.13, "steps": 3}
    body = {"run_id": "run", "round": 1, "event": event}
    with TestClient(app) as http:
        _register(http, tokens, "client-0", 50.0)
        first = http.post("/v1/clients/client-0/reports", json=body, headers=auth(tokens["c0"]))
        assert first.json()["method"] == "pld" and not first.json()["duplicate"]
    ledger.close()
    composition = pld.Composition(((0.33, 1.13, 3),))
    pld.EPSILONS._values.pop((composition, 1e-5))  # as in a new process: nothing cached
    app, ledger, _ = _service(tmp_path, pld_wait_s=1e-3)  # and no time to compute it
    with TestClient(app) as http:
        again = http.post("/v1/clients/client-0/reports", json=body, headers=auth(tokens["c0"]))
    assert again.status_code == 200
    assert again.content == first.content.replace(b'"duplicate":false', b'"duplicate":true')
    assert ledger.count("client-0") == 1


def test_concurrent_reports_of_one_client_accept_exactly_what_pld_fits(tmp_path):
    """30 reports at once, with a budget that PLD fits 4 times and RDP only 3: each is priced
    as the composition it commits to (the client's reports on their way to the commit
    included), so 4 are accepted, all decided by PLD (before: 2 accepted, 29 of 30 by RDP)."""
    event = SampledGaussianEvent(0.1, 1.01, 20)
    four, five = _pld_by_dp_accounting(event, 4), _pld_by_dp_accounting(event, 5)
    budget = (four + five) / 2
    assert epsilon([event] * 4, 1e-5, "rdp") > budget  # RDP alone would accept 3
    app, ledger, tokens = _service(tmp_path, pld_wait_s=120.0, pricing_budget_s=120.0)
    with TestClient(app) as http:
        _register(http, tokens, "client-0", budget)

        def send(rnd: int) -> dict:
            body = {"run_id": "run", "round": rnd, "event": json.loads(event.to_json())}
            r = http.post("/v1/clients/client-0/reports", json=body, headers=auth(tokens["c0"]))
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(send, range(30)))
    assert sum(a["accepted"] for a in answers) == 4 == ledger.count("client-0")
    assert [a["method"] for a in answers] == ["pld"] * 30
    assert ledger.spent("client-0") <= budget


def test_a_client_over_its_storage_quota_gets_429_and_stores_nothing(tmp_path):
    app, ledger, tokens = _service(tmp_path, max_client_bytes=4096)
    with TestClient(app) as http:
        _register(http, tokens, "client-0", 1e9)
        _register(http, tokens, "client-1", 1e9)
        statuses = []
        for rnd in range(100):  # a new event each time: its curve is stored too
            event = {"kind": "gaussian", "sigma": 10.0 + rnd}
            body = {"run_id": "run", "round": rnd, "event": event}
            r = http.post("/v1/clients/client-0/reports", json=body, headers=auth(tokens["c0"]))
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) > 0
                assert "--max-client-bytes" in r.json()["detail"]
        stored = ledger.count("client-0")
        assert statuses == [200] * stored + [429] * (100 - stored) and 0 < stored < 100
        assert ledger.stored_bytes("client-0") <= 4096
        body = {"run_id": "run", "round": 0, "event": {"kind": "gaussian", "sigma": 10.0}}
        other = http.post("/v1/clients/client-1/reports", json=body, headers=auth(tokens["c1"]))
        assert other.status_code == 200  # another client's quota is its own
        # a repeat of a stored report is still answered (it stores nothing)
        body = {"run_id": "run", "round": 0, "event": {"kind": "gaussian", "sigma": 10.0}}
        again = http.post("/v1/clients/client-0/reports", json=body, headers=auth(tokens["c0"]))
        assert again.status_code == 200 and again.json()["duplicate"]


def test_a_client_past_its_work_quota_gets_429_for_new_curves_and_rdp_for_plds(tmp_path):
    """Worker seconds are a per-client token bucket: a client that has spent them is refused
    new curves (429 with the refill's Retry-After) and its PLDs are left to RDP; another
    client still gets both."""
    quota = WorkQuota(burst=1e-9, rate=1e-6)  # spent after one computation
    app, ledger, tokens = _service(tmp_path, work_quota=quota, pld_wait_s=120.0)
    with TestClient(app) as http:
        _register(http, tokens, "client-0", 1e9)
        _register(http, tokens, "client-1", 1e9)

        def post(token: str, client: str, rnd: int, q: float):
            event = {"kind": "sampled_gaussian", "q": q, "sigma": 1.2, "steps": 1}
            body = {"run_id": "run", "round": rnd, "event": event}
            return http.post(f"/v1/clients/{client}/reports", json=body, headers=auth(token))

        first = post(tokens["c0"], "client-0", 1, 0.4101)  # its curve: the quota is spent
        assert first.status_code == 200 and first.json()["method"] == "rdp"
        refused = post(tokens["c0"], "client-0", 2, 0.4102)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 1
        assert "quota" in refused.json()["detail"]
        other = post(tokens["c1"], "client-1", 1, 0.4103)
        assert other.status_code == 200
    assert ledger.count("client-0") == 1


@pytest.mark.parametrize("route", ["plan", "status"])
def test_plans_and_statuses_never_compute_a_pld_in_the_service_process(
    tmp_path, monkeypatch, route
):
    """The issue's freeze: a plan (or a status after a restart) computed its PLD on the event
    loop. Here any PLD computed in the service process fails the test; the answers are still
    decided by PLD (computed in a worker)."""
    app, ledger, tokens = _service(tmp_path, pld_wait_s=120.0, pricing_budget_s=120.0)
    event = SampledGaussianEvent(0.37, 1.17, 2)
    with TestClient(app) as http:
        _register(http, tokens, "client-0", 50.0)
        ledger.computes_pld = True  # recorded as the embedded ledger does (computed here)
        ledger.report(EventKey("run", "client-0", 1), event)
        ledger.computes_pld = False
        recorded = pld.Composition(((0.37, 1.17, 2),))
        pld.EPSILONS._values.pop((recorded, 1e-5))  # as after a restart

        def in_this_process(*_):  # a fake standing in for the computation, named as such
            raise AssertionError("a PLD was computed in the service process")

        monkeypatch.setattr(pld, "compute_epsilon", in_this_process)
        if route == "plan":
            body = {"event": json.loads(event.to_json())}
            r = http.post("/v1/clients/client-0/plan", json=body, headers=auth(tokens["c0"]))
            assert r.json()["method"] == "pld"
        else:
            r = http.get("/v1/clients/client-0", headers=auth(tokens["c0"]))
            assert r.json()["epsilon_spent_by"] == "pld"
        assert r.status_code == 200
        assert pld.EPSILONS.get(recorded, 1e-5) is not None
