"""The accountant service's client library (used by the ClientApp with
``privacy.accountant.backend=http``, and by the server to register budgets).

Same methods and answers as the embedded :class:`~privfed.privacy.ledger.Ledger`. Every call has a
timeout; transport errors, timeouts, 429 and 5xx answers are retried with exponential backoff
(honouring ``Retry-After``) for ``retry_for_s`` seconds in all, 60 by default: longer than the
service takes to restart after a crash (about a second to answer here, a few under load), so a
restart costs a round some seconds, not a client. Retrying is safe for reports because they are
idempotent on their key: a report whose answer was lost is recorded once however often it is
retried. When the window is over :class:`AccountantUnavailable` is raised, and the ClientApp
then does not train (no unaccounted privacy spending).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx

from privfed.privacy.accountant import DEFAULT_METHOD, Method, Spent, check_method
from privfed.privacy.events import PrivacyEvent, event_from_json
from privfed.privacy.ledger import Answer, BudgetUnknownError, EventKey

TOKEN_ENV = "PRIVFED_ACCOUNTANT_TOKEN"


class AccountantUnavailable(RuntimeError):
    """The service did not answer (after retries)."""


class AccountantError(RuntimeError):
    """The service refused the request (4xx); retrying would not help."""


class AccountantClient:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 5.0,
        retry_for_s: float = 60.0,
        backoff_s: float = 0.2,
        verify: str | bool = True,
    ) -> None:
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise ValueError(f"accountant: no token (set ${TOKEN_ENV})")
        self.url = url.rstrip("/")
        self.retry_for_s, self.backoff_s = retry_for_s, backoff_s
        self._http = httpx.Client(
            base_url=self.url,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AccountantClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, params: Any = None) -> Any:
        deadline = time.monotonic() + self.retry_for_s
        delay = self.backoff_s
        while True:
            wait = delay
            try:
                response = self._http.request(method, path, json=body, params=params)
            except httpx.TransportError as err:  # connect errors, timeouts, resets
                failure: str = f"{type(err).__name__}: {err}"
            else:
                status = response.status_code
                if status < 500 and status != 429:
                    if status == 404 and "unknown client" in response.text:
                        raise BudgetUnknownError(response.json().get("detail"))
                    if status >= 400:
                        raise AccountantError(f"{method} {path}: {status} {response.text[:200]}")
                    return response.json()
                failure = f"HTTP {status} {response.text[:200]}"
                wait = max(delay, _retry_after(response))
            left = deadline - time.monotonic()
            if left <= 0:
                raise AccountantUnavailable(f"accountant at {self.url}: {failure}")
            time.sleep(min(wait, left))
            delay = min(delay * 2, 2.0)

    @staticmethod
    def _event_body(event: PrivacyEvent) -> dict:
        return json.loads(event.to_json())

    # -- the Ledger interface -----------------------------------------------------------------
    def set_budget(
        self, client_id: str, epsilon: float, delta: float, method: str = DEFAULT_METHOD
    ) -> None:
        body = {"client_id": client_id, "epsilon": epsilon, "delta": delta, "method": method}
        self._call("POST", "/v1/clients", body)

    def budget(self, client_id: str) -> tuple[float, float]:
        out = self._call("GET", f"/v1/clients/{client_id}")
        return float(out["epsilon_budget"]), float(out["delta"])  # float("Infinity") is inf

    def spent(self, client_id: str) -> float:
        return self.spent_by(client_id).epsilon

    def spent_by(self, client_id: str) -> Spent:
        out = self._call("GET", f"/v1/clients/{client_id}")
        return Spent(float(out["epsilon_spent"]), out["epsilon_spent_by"])

    def method(self, client_id: str) -> Method:
        return check_method(self._call("GET", f"/v1/clients/{client_id}")["method"])

    def clients(self) -> list[str]:
        return [c["client_id"] for c in self._call("GET", "/v1/clients")]

    def plan(self, client_id: str, event: PrivacyEvent) -> Answer:
        body = {"event": self._event_body(event)}
        return _answer(self._call("POST", f"/v1/clients/{client_id}/plan", body))

    def report(self, key: EventKey, event: PrivacyEvent) -> Answer:
        body = {
            "run_id": key.run_id,
            "round": key.round,
            "name": key.name,
            "event": self._event_body(event),
        }
        return _answer(self._call("POST", f"/v1/clients/{key.client_id}/reports", body))

    def has(self, key: EventKey) -> bool:
        params = {"run_id": key.run_id, "round": key.round, "name": key.name}
        return bool(self._call("GET", f"/v1/clients/{key.client_id}/reports", params=params))

    def events(self, client_id: str) -> list[PrivacyEvent]:
        rows = self._call("GET", f"/v1/clients/{client_id}/reports")
        return [event_from_json(json.dumps(r["event"])) for r in rows]

    def rows(self) -> list[tuple[str, str, int, str, str]]:
        out = []
        for client in self.clients():
            for r in self._call("GET", f"/v1/clients/{client}/reports"):
                event = json.dumps(r["event"], sort_keys=True)
                out.append((r["run_id"], client, r["round"], r["name"], event))
        return sorted(out, key=lambda r: (r[1], r[2], r[3]))


def _answer(out: dict) -> Answer:
    """An answer from its JSON (an unbounded epsilon arrives as the string "Infinity")."""
    return Answer(
        accepted=bool(out["accepted"]),
        duplicate=bool(out["duplicate"]),
        epsilon_spent=float(out["epsilon_spent"]),
        epsilon_after=float(out["epsilon_after"]),
        epsilon_budget=float(out["epsilon_budget"]),
        delta=float(out["delta"]),
        method=check_method(out["method"]),
    )


def _retry_after(response: httpx.Response) -> float:
    """The server's ``Retry-After`` in seconds (0 when absent or not a number), at most 10."""
    try:
        return min(10.0, max(0.0, float(response.headers.get("retry-after", 0))))
    except ValueError:
        return 0.0
