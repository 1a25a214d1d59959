"""The real accountant service on 127.0.0.1 (a subprocess on a random port): concurrent reports
never overspend, a kill -9 while clients report loses no acknowledged report and double-counts
nothing after the restart, TLS, and a federation that reports to it with the same results as the
embedded ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from privfed.privacy.events import RQMEvent, SampledGaussianEvent
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.service.auth import add_token
from privfed.privacy.service.client import AccountantClient, AccountantUnavailable

from ..helpers import free_port
from .conftest import run_privfed

pytestmark = pytest.mark.integration


class Service:
    """``privfed-accountant serve`` in its own process group; killed with it on stop."""

    def __init__(self, tmp: Path, port: int | None = None, tls: tuple[Path, Path] | None = None):
        self.tmp, self.port, self.tls = tmp, port or free_port(), tls
        self.db = tmp / "ledger.sqlite"
        self.tokens = tmp / "tokens.json"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Service:
        cmd = [
            sys.executable,
            "-m",
            "privfed.privacy.accountant_cli",
            "serve",
            "--port",
            str(self.port),
            "--db",
            str(self.db),
            "--tokens-file",
            str(self.tokens),
        ]
        if self.tls:
            cmd += ["--certfile", str(self.tls[0]), "--keyfile", str(self.tls[1])]
        with open(self.tmp / "service.err", "ab") as err:  # read by tests
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        verify = str(self.tls[0]) if self.tls else True
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the service exited"
            try:
                if httpx.get(self.url + "/health", timeout=1, verify=verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError("the service did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def service(tmp_path):
    svc = Service(tmp_path)
    op = add_token(svc.tokens, "operator", None)
    clients = {f"client-{i}": add_token(svc.tokens, "client", f"client-{i}") for i in range(4)}
    svc.start()
    try:
        yield svc, op, clients
    finally:
        svc.kill()


def test_concurrent_reports_for_one_client_never_overspend(service):
    svc, op, clients = service
    event = SampledGaussianEvent(q=0.1, sigma=2.0, steps=20)
    one = Ledger(svc.tmp / "scratch.sqlite")
    one.set_budget("x", 1e9, 1e-5)
    eps = [one.report(EventKey("r", "x", i), event).epsilon_spent for i in range(1, 13)]
    budget = (eps[4] + eps[5]) / 2  # exactly 5 events fit
    with AccountantClient(svc.url, op) as admin:
        admin.set_budget("client-0", budget, 1e-5)
    answers = []

    def worker(first: int) -> None:
        with AccountantClient(svc.url, clients["client-0"]) as c:
            for rnd in range(first, first + 3):
                answers.append(c.report(EventKey("run", "client-0", rnd), event))

    threads = [threading.Thread(target=worker, args=(1 + 3 * t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sum(a.accepted for a in answers) == 5 and len(answers) == 24
    ledger = Ledger(svc.db)
    assert ledger.count("client-0") == 5 and ledger.spent("client-0") <= budget


def test_kill_9_while_clients_report_loses_no_acknowledged_report(service):
    """kill -9 mid-round and restart: with the client library's default retry window every
    client's reports land (none gives up and sits out), nothing is lost or counted twice."""
    svc, op, clients = service
    with AccountantClient(svc.url, op) as admin:
        for c in clients:
            admin.set_budget(c, 1e9, 1e-5)
    event = SampledGaussianEvent(q=0.05, sigma=1.0, steps=10)
    acked: list[tuple[str, int, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop_reporting = threading.Event()

    def worker(client: str) -> None:
        try:
            with AccountantClient(svc.url, clients[client]) as c:  # the defaults
                for rnd in range(1, 100_000):
                    if stop_reporting.is_set():
                        return
                    answer = c.report(EventKey("run", client, rnd), event)
                    assert answer.accepted
                    with lock:
                        acked.append((client, rnd, time.monotonic()))
        except BaseException as err:  # noqa: BLE001 (reported by the test, not lost in a thread)
            errors.append(err)

    def wait_for(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(acked) < count and not errors and time.monotonic() < deadline:
            time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    wait_for(40)
    svc.kill()  # kill -9 mid-flight: some reports are committed but never answered
    killed_at = time.monotonic()
    acked_before_kill = {(c, r) for c, r, _ in acked}
    time.sleep(1.0)
    svc.start()
    wait_for(len(acked_before_kill) + 40)
    stop_reporting.set()
    for t in threads:
        t.join(timeout=120)
    assert errors == []  # no client gave up: the retry window outlasted the restart
    after = [(c, r, t) for c, r, t in acked if (c, r) not in acked_before_kill]
    assert {c for c, _, _ in after} == set(clients)  # every client reported after the restart
    print(f"first answer {min(t for *_, t in after) - killed_at:.2f} s after the kill")
    rows = Ledger(svc.db).rows()
    keys = [(client, rnd) for _, client, rnd, _, _ in rows]
    acked_keys = {(c, r) for c, r, _ in acked}
    assert len(keys) == len(set(keys))  # nothing recorded twice (retries after the restart)
    assert acked_keys <= set(keys)  # every acknowledged report is in the ledger
    # At most one report per client was in flight (committed, unanswered) at the kill.
    assert len(set(keys) - acked_keys) <= len(clients)


def test_a_poisoning_client_costs_honest_clients_nothing(service):
    """One client sends the events that used to raise inside the group commit (and roll back
    other clients' reports with it), while three honest clients report: every honest report is
    recorded, every poisoned one is a 422, and nothing is 5xx."""
    svc, op, clients = service
    with AccountantClient(svc.url, op) as admin:
        for c in clients:
            admin.set_budget(c, 1e9, 1e-5)
    poison = [
        {"kind": "gaussian", "sigma": 1e300},
        {"kind": "sampled_gaussian", "q": 0.1, "sigma": 1e-300, "steps": 1},
        {"kind": "rdp_curve", "orders": [1.05], "values": [0.1]},
        {"kind": "rqm", "c": 1.0, "delta": 0.25, "m": 256, "q": 0.5, "sensitivity": 0.1, "dims": 1},
    ]
    done = threading.Event()
    poisoned: list[int] = []
    honest_errors: list[BaseException] = []

    def attacker() -> None:
        head = {"Authorization": f"Bearer {clients['client-0']}"}
        with httpx.Client(base_url=svc.url, headers=head, timeout=30) as http:
            n = 0
            while not done.is_set():
                n += 1
                body = {"run_id": "poison", "round": n, "event": poison[n % len(poison)]}
                poisoned.append(http.post("/v1/clients/client-0/reports", json=body).status_code)

    def honest(client: str) -> None:
        try:
            with AccountantClient(svc.url, clients[client], retry_for_s=0) as c:  # no retries
                for rnd in range(150):
                    assert c.report(
                        EventKey("run", client, rnd), SampledGaussianEvent(0.1, 1.0, 1)
                    ).accepted
        except BaseException as err:  # noqa: BLE001
            honest_errors.append(err)

    bad = threading.Thread(target=attacker)
    bad.start()
    good = [
        threading.Thread(target=honest, args=(c,)) for c in ("client-1", "client-2", "client-3")
    ]
    for t in good:
        t.start()
    for t in good:
        t.join(timeout=120)
    done.set()
    bad.join(timeout=60)
    assert honest_errors == []
    ledger = Ledger(svc.db)
    assert [ledger.count(c) for c in ("client-1", "client-2", "client-3")] == [150, 150, 150]
    assert ledger.count("client-0") == 0
    assert len(poisoned) > 50 and set(poisoned) == {422}


def test_health_stays_fast_while_a_client_floods_expensive_events(service):
    """One client sends RQM events, each different (the pricing cache cannot help): they are
    priced in a worker process, one at a time for that client, so /health and the other
    clients' reports are not held up: an honest report (a new round count each time, so a new
    PLD) is not queued behind the flood's curves (with one pool for both, it waited up to the
    10 s time budget)."""
    svc, op, clients = service
    with AccountantClient(svc.url, op) as admin:
        for c in clients:
            admin.set_budget(c, 1e9, 1e-5)
    # What one flood event costs to price on this machine now (a shared machine's load slows
    # the service and this alike): a /health held behind a pricing takes at least this long.
    started = time.perf_counter()
    RQMEvent(c=1.0, delta=0.25, m=64, q=0.5, sensitivity=0.00999, dims=10).rdp()
    pricing_s = time.perf_counter() - started
    flooding = threading.Event()
    statuses: list[int] = []

    def flood(thread: int) -> None:
        head = {"Authorization": f"Bearer {clients['client-0']}"}
        with httpx.Client(base_url=svc.url, headers=head, timeout=30) as http:
            n = thread * 1_000_000  # every request a new event
            while not flooding.is_set():
                n += 1
                event = {
                    "kind": "rqm",
                    "c": 1.0,
                    "delta": 0.25,
                    "m": 64,
                    "q": 0.5,
                    "sensitivity": 0.01 + n * 1e-9,
                    "dims": 10,
                }
                body = {"run_id": "flood", "round": n, "event": event}
                statuses.append(http.post("/v1/clients/client-0/reports", json=body).status_code)

    flooders = [threading.Thread(target=flood, args=(i,)) for i in range(4)]
    for t in flooders:
        t.start()
    try:
        time.sleep(1.0)
        latencies, honest, honest_s = [], [], []
        with (
            httpx.Client(base_url=svc.url, timeout=10) as http,
            AccountantClient(svc.url, clients["client-1"]) as other,
        ):
            for rnd in range(40):
                started = time.perf_counter()
                assert http.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                started = time.perf_counter()
                honest.append(
                    other.report(EventKey("r", "client-1", rnd), SampledGaussianEvent(0.1, 1.0, 1))
                )
                honest_s.append(time.perf_counter() - started)
                time.sleep(0.05)
    finally:
        flooding.set()
        for t in flooders:
            t.join(timeout=60)
    ms = sorted(x * 1000 for x in latencies)
    honest_ms = sorted(x * 1000 for x in honest_s)
    print(
        f"/health under the flood: median {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms; "
        f"an honest report: median {honest_ms[len(honest_ms) // 2]:.0f} ms, "
        f"max {honest_ms[-1]:.0f} ms; one pricing {pricing_s * 1000:.0f} ms"
    )
    assert honest_ms[len(honest_ms) // 2] < 1000 * pricing_s / 2
    # Never behind a pricing, and typically a small fraction of one; the absolute tail belongs
    # to the benchmark (bench/accountant.py): a test shares a busy machine.
    assert ms[-1] < 1000 * pricing_s and ms[len(ms) // 2] < 1000 * pricing_s / 20
    assert all(a.accepted for a in honest)
    # Served one at a time (its requests wait their turn), or refused; never crashed
    assert statuses and set(statuses) <= {200, 429, 503}


def test_six_plans_of_new_compositions_do_not_freeze_the_service(service):
    """The issue's freeze: six concurrent plans, each a new q at sigma = 0.1 (a PLD of seconds),
    held /health for 8 s, because a plan computed its PLD on the event loop. Now every PLD is
    computed in a pricing worker: /health and another client's reports stay fast meanwhile."""
    svc, op, clients = service
    with AccountantClient(svc.url, op) as admin:
        for c in clients:
            admin.set_budget(c, 1e9, 1e-5)
    statuses: list[int] = []

    def plan(i: int) -> None:
        event = {"kind": "sampled_gaussian", "q": 0.11 + 0.1 * i, "sigma": 0.1, "steps": 1}
        head = {"Authorization": f"Bearer {clients['client-0']}"}
        r = httpx.post(
            svc.url + "/v1/clients/client-0/plan", json={"event": event}, headers=head, timeout=120
        )
        statuses.append(r.status_code)

    planners = [threading.Thread(target=plan, args=(i,)) for i in range(6)]
    for t in planners:
        t.start()
    health, honest = [], []
    with (
        httpx.Client(base_url=svc.url, timeout=30) as http,
        AccountantClient(svc.url, clients["client-1"]) as other,
    ):
        rnd = 0
        while any(t.is_alive() for t in planners) or rnd < 10:
            started = time.perf_counter()
            assert http.get("/health").status_code == 200
            health.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert other.report(
                EventKey("r", "client-1", rnd), SampledGaussianEvent(0.1, 1.0, 1)
            ).accepted
            honest.append(time.perf_counter() - started)
            rnd += 1
            time.sleep(0.05)
    for t in planners:
        t.join(timeout=120)
    print(
        f"/health during six plans: max {max(health) * 1000:.0f} ms over {len(health)}; "
        f"honest reports: max {max(honest) * 1000:.0f} ms"
    )
    assert statuses == [200] * 6
    # before: 8,034 ms; a generous bound for a shared machine (the tail is the benchmark's)
    assert max(health) < 1.0 and sorted(honest)[len(honest) // 2] < 1.0


def test_a_killed_service_leaves_no_process_behind(tmp_path):
    """kill -9 of the service, ten times: its pricing workers (and multiprocessing's resource
    tracker) go with it, every time (before: two orphans per kill)."""
    import psutil

    svc = Service(tmp_path)
    add_token(svc.tokens, "operator", None)
    for _ in range(10):
        svc.start()
        children = psutil.Process(svc.proc.pid).children(recursive=True)
        assert len(children) >= 2  # the resource tracker and the warm PLD workers
        os.kill(svc.proc.pid, signal.SIGKILL)  # the service alone, not its process group
        svc.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        for p in alive:  # clean up before failing
            p.kill()
        assert not alive, [p.cmdline() for p in alive]


def test_ctrl_c_stops_the_service_cleanly(tmp_path):
    """Ctrl-C reaches the service's whole process group (its pricing workers too): it exits 0
    without a traceback, and leaves no process behind."""
    import psutil

    svc = Service(tmp_path)
    add_token(svc.tokens, "operator", None)
    svc.start()
    children = psutil.Process(svc.proc.pid).children(recursive=True)
    os.killpg(svc.proc.pid, signal.SIGINT)
    assert svc.proc.wait(timeout=30) == 0
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        p.kill()
    assert not alive
    assert "Traceback" not in (tmp_path / "service.err").read_text()


def test_unreachable_service_raises_after_bounded_retries(tmp_path):
    c = AccountantClient(
        f"http://127.0.0.1:{free_port()}", "t", timeout_s=0.5, retry_for_s=0.5, backoff_s=0.05
    )
    started = time.monotonic()
    with pytest.raises(AccountantUnavailable):
        c.spent("client-0")
    assert time.monotonic() - started < 10


def test_tls_with_a_private_ca(tmp_path):
    cert, key = self_signed(tmp_path)
    svc = Service(tmp_path, tls=(cert, key))
    op = add_token(svc.tokens, "operator", None)
    svc.start()
    try:
        with AccountantClient(svc.url, op, verify=str(cert)) as c:
            c.set_budget("client-0", 1.0, 1e-5)
            assert c.clients() == ["client-0"]
        with pytest.raises(httpx.HTTPError):  # plain http to the TLS port
            httpx.get(f"http://127.0.0.1:{svc.port}/health", timeout=2)
        with AccountantClient(svc.url, op, retry_for_s=0) as unverified:  # the system CAs: refused
            with pytest.raises(AccountantUnavailable):
                unverified.clients()
    finally:
        svc.kill()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_a_federation_reporting_to_the_service_matches_the_embedded_ledger(
    tmp_path, tiny_overrides
):
    svc = Service(tmp_path / "svc")
    svc.tmp.mkdir()
    op = add_token(svc.tokens, "operator", None)
    tokens = {f"client-{i}": add_token(svc.tokens, "client", f"client-{i}") for i in range(3)}
    client_tokens = tmp_path / "client_tokens.json"
    client_tokens.write_text(json.dumps(tokens))
    svc.start()
    try:
        os.environ["PRIVFED_ACCOUNTANT_OPERATOR_TOKEN"] = op
        http_run = run_privfed(
            tmp_path / "http",
            *tiny_overrides,
            "num_rounds=2",
            "privacy.accountant.backend=http",
            f"privacy.accountant.url={svc.url}",
            f"privacy.accountant.client_tokens_file={client_tokens}",
        )
        # The service keeps lifetime budgets: a second run on the same ledger trains nobody,
        # and must say so (who, how much of which budget, how to reset) rather than look fine.
        again = run_privfed(
            tmp_path / "again",
            *tiny_overrides,
            "num_rounds=1",
            "privacy.accountant.backend=http",
            f"privacy.accountant.url={svc.url}",
            f"privacy.accountant.client_tokens_file={client_tokens}",
        )
    finally:
        os.environ.pop("PRIVFED_ACCOUNTANT_OPERATOR_TOKEN", None)
        svc.kill()
    assert http_run.returncode == 0, http_run.stdout[-4000:]
    assert again.returncode == 0, again.stdout[-4000:]
    spent = json.loads((tmp_path / "again" / "run" / "summary.json").read_text())
    assert sorted(spent["clients_out_of_budget"]) == sorted(tokens)
    for entry in spent["clients_out_of_budget"].values():
        assert entry["reason"] == "over-budget" and entry["epsilon_budget"] == 8.0
        assert 7.0 < entry["epsilon_spent"] <= 8.0
    tail = again.stdout[-3000:]
    assert "3 client(s) sat out because their budget is spent" in tail, tail
    assert "docker compose down -v" in tail and "client-2 sat out, budget spent" in tail
    embedded_run = run_privfed(tmp_path / "embedded", *tiny_overrides, "num_rounds=2")
    assert embedded_run.returncode == 0, embedded_run.stdout[-4000:]

    def summary(d):
        return json.loads((d / "run" / "summary.json").read_text())

    s_http, s_emb = summary(tmp_path / "http"), summary(tmp_path / "embedded")
    assert s_http["epsilon_spent"] == pytest.approx(s_emb["epsilon_spent"], rel=1e-12)
    assert s_http["noise_multiplier"] == s_emb["noise_multiplier"]
    served = [(c, r, n, e) for _, c, r, n, e in Ledger(svc.db).rows()]
    embedded = [
        (c, r, n, e)
        for _, c, r, n, e in Ledger(tmp_path / "embedded" / "run" / "ledger.sqlite").rows()
    ]
    assert served == embedded and len(served) == 6
    assert not (tmp_path / "http" / "run" / "ledger.sqlite").exists()  # nothing local
