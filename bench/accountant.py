"""The accountant service under load: durable reports per second and latency percentiles.

    python bench/accountant.py [--reports 4000] [--concurrency 1 8 64] [--repeats 3]
    python bench/accountant.py --crash-cycles 20      # the kill -9 test, many times
    python bench/accountant.py --only restart flood   # one part only
    python bench/accountant.py --only run --method pld rdp   # a real run's reports, PLD vs RDP
    python bench/accountant.py --only composition   # one PLD epsilon: ours vs dp-accounting's

Starts ``privfed-accountant serve`` on 127.0.0.1 (a fresh ledger per level), then ``C``
concurrent clients (asyncio keep-alive connections, each with its own client id and token) send
distinct sampled-Gaussian reports; every answer arrives after the report's COMMIT (WAL,
synchronous=FULL). Prints reports/s and p50/p99 latency per concurrency level, next to the limit
the disk sets: each group commit needs one fsync and each client has one report in flight, so at
most ``clients / fsync time`` reports/s (the fsync time is measured in the same run, on the same
disk: fdatasync of a 4 KiB append, as SQLite's WAL commit). Then: how long the epsilon query
takes for a client with 10,000 events; how long a restarted service takes to answer every client
when each has 10,000 distinct past events; and /health's latency while one client floods the
service with expensive (RQM) events. ``run``: the reports of real runs (the default run's event,
the same every round, every client reporting round r before r + 1) under each accountant method:
with PLD, each new round is a new composition whose epsilon the pricing worker computes once for
all the clients at that round. ``--crash-cycles`` repeats the crash test of
tests/integration/test_accountant_service.py: kill -9 the service while clients report, restart,
check that every acknowledged report is in the ledger exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from privfed.privacy.events import SampledGaussianEvent  # noqa: E402
from privfed.privacy.ledger import EventKey, Ledger  # noqa: E402
from privfed.privacy.service.auth import add_token  # noqa: E402
from privfed.privacy.service.client import AccountantClient  # noqa: E402

EVENT = {"kind": "sampled_gaussian", "q": 0.01, "sigma": 1.0, "steps": 100}
RUN_EVENT = {"kind": "sampled_gaussian", "q": 0.7191, "sigma": 1.6214, "steps": 1}  # README's run
RUN_EVENT_ARGS = {k: v for k, v in RUN_EVENT.items() if k != "kind"}
SERVICE_ENV: dict[str, str] = {}  # --fsync-delay-ms: LD_PRELOAD of bench/fsync_delay.c
METHOD = {"method": "pld"}  # --method: the accountant every budget of the bench is measured by


def slow_fsync(delay_ms: float) -> None:
    """Build bench/fsync_delay.c and have every service (and the fsync probe) use it."""
    if delay_ms <= 0:
        return
    out = Path(tempfile.mkdtemp()) / "fsync_delay.so"
    try:
        subprocess.run(
            [
                "cc",
                "-shared",
                "-fPIC",
                "-O2",
                "-o",
                str(out),
                str(REPO / "bench/fsync_delay.c"),
                "-ldl",
            ],
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"--fsync-delay-ms needs a C compiler (cc): {err}") from None
    SERVICE_ENV.update(LD_PRELOAD=str(out), PRIVFED_FSYNC_DELAY_US=str(int(delay_ms * 1000)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(db: Path, tokens: Path, port: int) -> subprocess.Popen:
    """``privfed-accountant serve`` in its own process group (not waited for)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "privfed.privacy.accountant_cli",
            "serve",
            "--port",
            str(port),
            "--db",
            str(db),
            "--tokens-file",
            str(tokens),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **SERVICE_ENV},
    )


def start(db: Path, tokens: Path, port: int) -> subprocess.Popen:
    """:func:`spawn`, then wait until /health answers 200."""
    proc = spawn(db, tokens, port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError("service did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


async def one_client(
    port: int,
    cid: str | list[tuple[str, str]],
    token: str,
    reports: int,
    latencies: list,
    event: dict = EVENT,
) -> None:
    """Reports over one keep-alive HTTP/1.1 connection, written by hand on asyncio streams: an
    HTTP client library costs more CPU per request than the service, and the load generator
    shares the machine's two cores with it. ``cid`` may be a list of (client, token): then each
    round is reported for every one of them before the next round (many clients, one link)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clients = cid if isinstance(cid, list) else [(cid, token)]
    try:
        for rnd, (client, secret) in (
            (r, c) for r in range(reports // len(clients)) for c in clients
        ):
            head = f"POST /v1/clients/{client}/reports HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            head += f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
            body = json.dumps({"run_id": "bench", "round": rnd, "event": event}).encode()
            request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
            t0 = time.perf_counter()
            writer.write(request)
            status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in header_lines
                if line.lower().startswith(b"content-length:")
            )
            answer = json.loads(await reader.readexactly(length))
            latencies.append(time.perf_counter() - t0)
            assert status_line.split()[1] == b"200" and answer["accepted"], answer
    finally:
        writer.close()


async def load(port: int, tokens: dict[str, str], total: int) -> list[float]:
    latencies: list[float] = []
    per_client = total // len(tokens)
    await asyncio.gather(
        *(one_client(port, c, t, per_client, latencies) for c, t in tokens.items())
    )
    return latencies


def fsync_seconds(directory: str, samples: int = 300) -> float:
    """Median time of fdatasync after a 4 KiB append (a WAL commit's sync) in ``directory``
    (in a subprocess with the service's environment, so that --fsync-delay-ms counts too)."""
    if SERVICE_ENV:
        code = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import accountant; "
        code += f"print(accountant.fsync_seconds({directory!r}, {samples}))"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **SERVICE_ENV},
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.strip().splitlines()[-1])
    path = Path(directory) / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    times = []
    try:
        for _ in range(samples):
            os.write(fd, b"\0" * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return float(np.median(times))


def throughput(total: int, levels: list[int], repeats: int) -> None:
    print(
        f"| concurrent clients | reports/s (durable), median of {repeats} [min, max] "
        "| p50 ms | p99 ms | service CPU µs/report | fsync ms | fsync limit/s | reached |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c in levels:
        runs = sorted((_one_level(total, c) for _ in range(repeats)), key=lambda r: r[0])
        rate, p50, p99, cpu, fsync = runs[len(runs) // 2]
        limit = c / fsync
        spread = f" [{runs[0][0]:,.0f}, {runs[-1][0]:,.0f}]" if repeats > 1 else ""
        print(
            f"| {c} | {rate:,.0f}{spread} | {p50:.1f} | {p99:.1f} | {cpu:.0f} | "
            f"{fsync * 1000:.2f} | {limit:,.0f} | {rate / limit:.2f} |",
            flush=True,
        )
    print(
        "\n(the fsync limit is clients / fsync time; where the service CPU per report times the "
        "rate nears one core, the CPU binds first)"
    )


def _one_level(total: int, c: int) -> tuple[float, float, float, float, float]:
    """(reports/s, p50 ms, p99 ms, service CPU µs per report, fsync s) of one run with ``c``
    clients; the fsync time is measured right after the run, in the ledger's directory."""
    with tempfile.TemporaryDirectory() as tmp:
        db, tokens_file, port = Path(tmp) / "l.sqlite", Path(tmp) / "t.json", free_port()
        op = add_token(tokens_file, "operator", None)
        tokens = {f"c{i}": add_token(tokens_file, "client", f"c{i}") for i in range(c)}
        proc = start(db, tokens_file, port)
        try:
            with AccountantClient(f"http://127.0.0.1:{port}", op) as admin:
                for cid in tokens:
                    admin.set_budget(cid, 1e9, 1e-5, **METHOD)
            n = (total // c) * c
            cpu0 = _cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            lat = asyncio.run(load(port, tokens, n))
            wall = time.perf_counter() - t0
            cpu = _cpu_seconds(proc.pid) - cpu0
            if os.environ.get("PRIVFED_BENCH_VERBOSE"):
                text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
                print([ln for ln in text.splitlines() if "commit_items_" in ln and "#" not in ln])
            assert len(Ledger(db).rows()) == n  # every acknowledged report is there
        finally:
            stop(proc)
        fsync = fsync_seconds(tmp)
    ms = np.array(lat) * 1000
    return n / wall, np.percentile(ms, 50), np.percentile(ms, 99), cpu / n * 1e6, fsync


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def epsilon_query(events: int) -> None:
    """epsilon of a client with ``events`` identical past events (each one DP-SGD step, q = 0.01,
    sigma = 1: a composition PLD accounts), on a fresh connection: first in a fresh process (its
    PLD computed: the cold cost), then with the process's caches warm (a new connection's)."""
    code = (
        "import sys, time; sys.path.insert(0, {repo!r}); from privfed.privacy.ledger import "
        "Ledger; t0 = time.perf_counter(); s = Ledger({db!r}).spent_by('c'); "
        "print(time.perf_counter() - t0, s.epsilon, s.method)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "l.sqlite"
        ledger = Ledger(db)
        ledger.set_budget("c", 1e12, 1e-5, **METHOD)
        import sqlite3

        with sqlite3.connect(db) as con:  # bulk-load the history
            ev = SampledGaussianEvent(0.01, 1.0, 1).to_json()
            con.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                [("r", "c", i, "dp_sgd", ev, 0.0) for i in range(events)],
            )
        cold = []
        for _ in range(3):  # a fresh process each time: nothing cached but the stored curve
            out = subprocess.run(
                [sys.executable, "-c", code.format(repo=str(REPO), db=str(db))],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            cold.append(float(out[0]))
            eps, method = float(out[1]), out[2]
        ledger.spent("c")  # this process's caches, warm
        times = []
        for _ in range(20):  # a new Ledger each time: a new connection, its caches empty
            fresh = Ledger(db)
            t0 = time.perf_counter()
            fresh.spent("c")
            times.append(time.perf_counter() - t0)
            fresh.close()
    print(
        f"\nepsilon query over {events:,} events ({method}: epsilon {eps:.3f}): in a fresh process "
        f"median {np.median(cold) * 1000:.0f} ms (import and connection included); on a new "
        f"connection of a warm process median {np.median(times) * 1000:.1f} ms (max "
        f"{max(times) * 1000:.1f} ms; target < 50 ms)"
    )


def new_kind_of_event(kinds: int = 5) -> None:
    """What a report of a new kind of event costs the accountant (its RDP curve and, with PLD,
    its privacy loss distribution, composed with the client's history), in this process."""
    from privfed.privacy.accountant import spent

    costs = []
    for k in range(kinds):
        event = SampledGaussianEvent(0.7 - 0.01 * k, 1.6 + 0.01 * k, 1)
        t0 = time.perf_counter()
        spent([event] * 10, 1e-5, METHOD["method"])  # ten rounds of it: one composition
        costs.append(time.perf_counter() - t0)
    print(
        f"\na new kind of event, its first epsilon over 10 rounds ({METHOD['method']}): median "
        f"{np.median(costs) * 1000:.0f} ms (min {min(costs) * 1000:.0f}, max "
        f"{max(costs) * 1000:.0f})"
    )


def real_runs(shapes: list[tuple[int, int]], methods: list[str], connections: int = 8) -> None:
    """Reports of real runs, ``clients`` x ``rounds`` each, over ``connections`` connections
    (clients spread over them), under each method: reports/s and latency. Each on a fresh
    service ("cold": the first report waits for the pricing worker to start and build the
    event's distribution) and on one that has seen the event once ("warm": one report by
    another client first, untimed)."""
    print(
        "\n| accountant | clients x rounds | service | reports/s | p50 ms | p99 ms | max ms |"
        " compositions |\n|---|---|---|---|---|---|---|---|"
    )
    for (clients, rounds), warm, method in itertools.product(shapes, (False, True), methods):
        with tempfile.TemporaryDirectory() as tmp:
            db, tokens_file, port = Path(tmp) / "l.sqlite", Path(tmp) / "t.json", free_port()
            op = add_token(tokens_file, "operator", None)
            tokens = {f"c{i}": add_token(tokens_file, "client", f"c{i}") for i in range(clients)}
            warm_token = add_token(tokens_file, "client", "warm-up")
            proc = start(db, tokens_file, port)
            try:
                with AccountantClient(f"http://127.0.0.1:{port}", op) as admin:
                    for cid in tokens:
                        admin.set_budget(cid, 1e9, 1e-5, method)
                    if warm:
                        admin.set_budget("warm-up", 1e9, 1e-5, method)
                        with AccountantClient(f"http://127.0.0.1:{port}", warm_token) as c:
                            c.report(
                                EventKey("warm", "warm-up", 0),
                                SampledGaussianEvent(**RUN_EVENT_ARGS),
                            )
                links = [list(tokens.items())[i::connections] for i in range(connections)]
                links = [link for link in links if link]
                latencies: list[float] = []

                async def go(links=links, rounds=rounds, latencies=latencies, port=port) -> None:
                    await asyncio.gather(
                        *(
                            one_client(port, link, "", rounds * len(link), latencies, RUN_EVENT)
                            for link in links
                        )
                    )

                t0 = time.perf_counter()
                asyncio.run(go())
                wall = time.perf_counter() - t0
                methods_used = {Ledger(db).spent_by(c).method for c in tokens}
            finally:
                stop(proc)
        ms = np.array(latencies) * 1000
        print(
            f"| {method} ({'/'.join(sorted(methods_used))}) | {clients} x {rounds} | "
            f"{'warm' if warm else 'cold'} | {len(ms) / wall:,.0f} | {np.percentile(ms, 50):.1f} | "
            f"{np.percentile(ms, 99):.1f} | {ms.max():.0f} | {rounds} |",
            flush=True,
        )


def restart(clients: int, events: int) -> None:
    """kill -9 a service whose ledger holds ``events`` distinct past events per client, restart
    it, and time the first answer to every client (each client's first report composes all of
    its history)."""
    with tempfile.TemporaryDirectory() as tmp:
        db, tokens_file, port = Path(tmp) / "l.sqlite", Path(tmp) / "t.json", free_port()
        add_token(tokens_file, "operator", None)
        tokens = {f"c{i}": add_token(tokens_file, "client", f"c{i}") for i in range(clients)}
        ledger = Ledger(db)
        for n, cid in enumerate(tokens):
            ledger.set_budget(cid, 1e12, 1e-5, **METHOD)
            history = [
                (
                    EventKey("past", cid, i),
                    SampledGaussianEvent(0.01, 1.0 + (n * events + i) * 1e-7, 10),
                )
                for i in range(events)
            ]
            ledger.report_many(history)  # stores each event's curve beside it
        ledger.close()
        proc = start(db, tokens_file, port)
        stop(proc)  # kill -9
        t0 = time.perf_counter()
        proc = spawn(db, tokens_file, port)
        try:
            answered = {}
            with httpx.Client(timeout=30) as http:
                for cid, token in tokens.items():
                    body = {"run_id": "now", "round": 0, "event": EVENT}
                    while True:
                        try:
                            r = http.post(
                                f"http://127.0.0.1:{port}/v1/clients/{cid}/reports",
                                json=body,
                                headers={"Authorization": f"Bearer {token}"},
                            )
                            if r.status_code == 200:
                                break
                        except httpx.TransportError:
                            time.sleep(0.02)
                    answered[cid] = time.perf_counter() - t0
        finally:
            stop(proc)
    print(
        f"\nrestart with {events:,} distinct past events for each of {clients} clients: first "
        f"client answered {min(answered.values()):.2f} s after the restart began, the last "
        f"{max(answered.values()):.2f} s (target: within 3 s; the client library retries 60 s)"
    )


FLOODS = {  # what one client sends, each request new: the most expensive the limits allow
    "rqm reports": lambda n: (
        "reports",
        {
            "run_id": "flood",
            "round": n,
            "event": {
                "kind": "rqm",
                "c": 1.0,
                "delta": 0.25,
                "m": 64,
                "q": 0.5,
                "sensitivity": 0.01 + n * 1e-9,
                "dims": 10,
            },
        },
    ),
    "plans, a new q at sigma 0.1": lambda n: (  # the freeze: a PLD of seconds each
        "plan",
        {
            "event": {
                "kind": "sampled_gaussian",
                "q": 0.11 + (n % 10**6) * 1e-7,
                "sigma": 0.1,
                "steps": 1,
            }
        },
    ),
    "reports, a new curve each": lambda n: (
        "reports",
        {
            "run_id": "flood",
            "round": n,
            "event": {
                "kind": "sampled_gaussian",
                "q": 0.9999 - n * 1e-12,
                "sigma": 1e10,
                "steps": 1,
            },
        },
    ),
}
FLOODS["all three, mixed"] = lambda n: list(FLOODS.values())[n % 3](n)


def flood(seconds: float = 8.0) -> None:
    """/health and an honest client's reports (a new round each, so a new PLD) while one client
    floods the service over 6 connections, for each flood of FLOODS, beside the same with no
    flood, in one run: latencies (p50/p99) and the fraction of honest reports RDP decided."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        db, tokens_file, port = Path(tmp) / "l.sqlite", Path(tmp) / "t.json", free_port()
        op = add_token(tokens_file, "operator", None)
        token = add_token(tokens_file, "client", "attacker")
        honest_token = add_token(tokens_file, "client", "honest")
        proc = start(db, tokens_file, port)
        url = f"http://127.0.0.1:{port}"
        rounds = iter(range(10**9))
        try:
            with AccountantClient(url, op) as admin:
                admin.set_budget("attacker", 1e12, 1e-5)
                admin.set_budget("honest", 1e12, 1e-5)
            rows.append(("none (quiet)", *_observed(url, honest_token, rounds, seconds), {}))
            for name, request in FLOODS.items():
                done, statuses = threading.Event(), []

                def attack(thread: int, request=request, done=done, statuses=statuses) -> None:
                    head = {"Authorization": f"Bearer {token}"}
                    with httpx.Client(base_url=url, headers=head, timeout=60) as http:
                        n = thread * 10**5 + 10**6 * len(rows)
                        while not done.is_set():
                            n += 1
                            route, body = request(n)
                            r = http.post(f"/v1/clients/attacker/{route}", json=body)
                            statuses.append(r.status_code)

                threads = [threading.Thread(target=attack, args=(i,)) for i in range(6)]
                for t in threads:
                    t.start()
                time.sleep(0.5)
                observed = _observed(url, honest_token, rounds, seconds)
                done.set()
                for t in threads:
                    t.join(timeout=60)
                counts = {s: statuses.count(s) for s in sorted(set(statuses))}
                rows.append((name, *observed, counts))
        finally:
            stop(proc)
    print(
        "\n| one client floods | /health p50 / p99 ms | honest report p50 / p99 ms | "
        "honest decided by RDP | the flood's answers |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, health, honest, by_rdp, counts in rows:
        print(
            f"| {name} | {np.percentile(health, 50):.1f} / {np.percentile(health, 99):.1f} | "
            f"{np.percentile(honest, 50):.1f} / {np.percentile(honest, 99):.1f} | "
            f"{by_rdp:.0%} | {counts or '-'} |"
        )
    print("(targets: /health p99 <= 50 ms, honest p99 <= 100 ms)")


def _observed(url: str, token: str, rounds, seconds: float) -> tuple[np.ndarray, np.ndarray, float]:
    """/health latencies, an honest client's report latencies and its fraction decided by RDP:
    one of each every 20 ms for ``seconds``."""
    health, honest, methods = [], [], []
    event = {"kind": "sampled_gaussian", "q": 0.01, "sigma": 1.0, "steps": 10}
    head = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            assert http.get("/health").status_code == 200
            health.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            body = {"run_id": "honest", "round": next(rounds), "event": event}
            r = http.post("/v1/clients/honest/reports", json=body, headers=head)
            honest.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
            methods.append(r.json()["method"])
            time.sleep(0.02)
    return np.asarray(health), np.asarray(honest), methods.count("rdp") / len(methods)


def profile(reports: int = 4000, clients: int = 8) -> None:
    """Where a report's CPU goes inside the service, stage by stage, in this process (no HTTP):
    body parsing, pricing (the curve and PLD caches warm, as for a run's reports), the group
    commit (``report_many``, 8 reports a batch as at 8 clients, each its own round) and the
    answer's serialisation; for PLD budgets and for RDP budgets in the same run, so their ratio
    holds on a shared machine. The HTTP server's part is the rest of the service's CPU per report
    (``--only throughput``)."""
    rows = {
        method: asyncio.run(_profile_run(method, reports, clients)) for method in ("rdp", "pld")
    }
    print("\n| stage | RDP µs/report | PLD µs/report | PLD / RDP |")
    print("| --- | --- | --- | --- |")
    for stage in [*rows["rdp"], "total"]:
        r = sum(rows["rdp"].values()) if stage == "total" else rows["rdp"][stage]
        p = sum(rows["pld"].values()) if stage == "total" else rows["pld"][stage]
        print(f"| {stage} | {r:.0f} | {p:.0f} | {p / r:.2f} |")


async def _profile_run(method: str, reports: int, clients: int) -> dict[str, float]:
    """CPU µs per report in each stage (process time: a pricing worker's is not counted)."""
    from privfed.privacy.service.pricing import Pricer
    from privfed.privacy.service.requests import parse
    from privfed.privacy.service.schemas import AnswerOut, ReportIn

    stages = {"parse": 0.0, "price": 0.0, "commit": 0.0, "answer": 0.0}
    event = {"kind": "sampled_gaussian", "q": 0.01, "sigma": 1.0, "steps": 10}
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp) / "l.sqlite")
        ledger.computes_pld = False
        for c in range(clients):
            ledger.set_budget(f"c{c}", 1e9, 1e-5, method)
        pricer = Pricer(ledger, workers=1)
        await pricer.warm_up()
        try:
            for start in range(0, reports, clients):
                batch = []
                for i in range(start, start + clients):
                    rnd, cid = i // clients + 1, f"c{i % clients}"
                    raw = json.dumps({"run_id": "run", "round": rnd, "event": event}).encode()
                    t0 = time.process_time()
                    parsed = parse(ReportIn, raw).event
                    t1 = time.process_time()
                    async with pricer.turn(cid):
                        await pricer.price(cid, parsed)
                    stages["parse"] += t1 - t0
                    stages["price"] += time.process_time() - t1
                    batch.append((EventKey("run", cid, rnd), parsed))
                t0 = time.process_time()
                answers = ledger.report_many(batch)
                t1 = time.process_time()
                for answer in answers:
                    AnswerOut(**answer.__dict__).model_dump_json()
                stages["commit"] += t1 - t0
                stages["answer"] += time.process_time() - t1
        finally:
            pricer.close()
            ledger.close()
    return {k: v / reports * 1e6 for k, v in stages.items()}


COMPOSITIONS = [  # (q, sigma, steps): what the runs and the bench's loads compose
    (0.7191, 1.5081, 10),  # the default run at epsilon = 8, its last round
    (0.01, 1.0, 100),  # the throughput load, round 1
    (0.01, 1.0, 10_000),  # ... round 100
    (0.01, 1.0, 50_000),  # ... round 500
    (0.004, 0.8, 2500),
]


def composition_cost(repeats: int = 15) -> None:
    """One epsilon of a new composition (the base distribution already built, as in a service
    that has seen the event): privfed's self-composition against dp-accounting's own
    ``self_compose`` + ``get_epsilon_for_delta`` on the same base, interleaved, median of
    ``repeats`` each. The ratio is the figure; both run in this process, one after the other."""
    from privfed.privacy import pld

    print(f"\n{'(q, sigma, steps)':<24} {'dp-accounting':>14} {'privfed':>9} {'speed-up':>9}  eps")
    for q, sigma, steps in COMPOSITIONS:
        base = pld._sampled_gaussian(q, sigma)
        composition = pld.Composition(((q, sigma, steps),))
        pld.compute_epsilon(composition, 1e-5)  # the base's cached parts, built once
        theirs, ours = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            want = base.self_compose(steps, pld.TAIL_MASS).get_epsilon_for_delta(1e-5)
            t1 = time.perf_counter()
            got = pld.compute_epsilon(composition, 1e-5)
            t2 = time.perf_counter()
            theirs.append(t1 - t0)
            ours.append(t2 - t1)
        a, b = np.median(theirs) * 1e3, np.median(ours) * 1e3
        print(
            f"{str((q, sigma, steps)):<24} {a:>11.1f} ms {b:>6.2f} ms {a / b:>8.1f}x  "
            f"{got:.6f} (theirs {want:.6f})"
        )


def crash_cycles(cycles: int) -> None:
    bad = 0
    for cycle in range(cycles):
        with tempfile.TemporaryDirectory() as tmp:
            db, tokens_file, port = Path(tmp) / "l.sqlite", Path(tmp) / "t.json", free_port()
            op = add_token(tokens_file, "operator", None)
            tokens = {f"c{i}": add_token(tokens_file, "client", f"c{i}") for i in range(4)}
            proc = start(db, tokens_file, port)
            url = f"http://127.0.0.1:{port}"
            with AccountantClient(url, op) as admin:
                for cid in tokens:
                    admin.set_budget(cid, 1e9, 1e-5)
            acked, lock, done = [], threading.Lock(), threading.Event()
            event = SampledGaussianEvent(0.01, 1.0, 100)

            def worker(  # the loop's objects, bound now (threads are joined in this cycle)
                cid: str, token: str, url=url, done=done, event=event, lock=lock, acked=acked
            ) -> None:
                with AccountantClient(url, token, timeout_s=2, retry_for_s=60, backoff_s=0.05) as c:
                    for rnd in range(10_000):
                        if done.is_set():
                            return
                        c.report(EventKey("r", cid, rnd), event)
                        with lock:
                            acked.append((cid, rnd))

            threads = [threading.Thread(target=worker, args=kv) for kv in tokens.items()]
            for t in threads:
                t.start()
            time.sleep(0.5 + 0.5 * (cycle % 3))
            stop(proc)
            proc = start(db, tokens_file, port)
            time.sleep(0.5)
            done.set()
            for t in threads:
                t.join(timeout=60)
            stop(proc)
            keys = [(c, r) for _, c, r, _, _ in Ledger(db).rows()]
            ok = len(keys) == len(set(keys)) and set(acked) <= set(keys)
            bad += not ok
            print(
                f"cycle {cycle + 1}: {len(acked)} acknowledged, {len(keys)} recorded, "
                f"{'ok' if ok else 'LOST OR DOUBLE-COUNTED'}",
                flush=True,
            )
    print(f"\n{cycles - bad}/{cycles} crash cycles lost nothing and double-counted nothing")
    if bad:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=3, help="runs per level (median shown)")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--crash-cycles", type=int, default=0)
    parser.add_argument(
        "--fsync-delay-ms", type=float, default=0.0, help="add this to every fsync (a slow disk)"
    )
    parser.add_argument(
        "--method",
        nargs="+",
        choices=["pld", "rdp"],
        default=["pld"],
        help="accountant method(s); the first is used by every part but 'run', which runs each",
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["8x10", "8x100", "400x10"],
        help="'run' part: clients x rounds of each measured run shape",
    )
    parts = ("throughput", "query", "restart", "flood", "run", "composition", "profile")
    parser.add_argument("--only", nargs="+", choices=parts, default=list(parts))
    args = parser.parse_args()
    METHOD["method"] = args.method[0]
    slow_fsync(args.fsync_delay_ms)
    if args.crash_cycles:
        crash_cycles(args.crash_cycles)
        return
    if "throughput" in args.only:
        throughput(args.reports, args.concurrency, args.repeats)
    if "query" in args.only:
        epsilon_query(args.events)
        new_kind_of_event()
    if "restart" in args.only:
        restart(8, args.events)
    if "flood" in args.only:
        flood()
    if "composition" in args.only:
        composition_cost()
    if "profile" in args.only:
        profile()
    if "run" in args.only:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.runs]
        real_runs(shapes, args.method)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
