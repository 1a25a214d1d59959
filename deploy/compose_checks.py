"""Checks of a compose federation, made from outside its containers (deploy/ci-compose.sh).

Each check prints one line and exits non-zero on failure. Standard library only: it runs on the
host with whatever Python is there, reading the named volumes' directories and the published
ports on 127.0.0.1.

    compose_checks.py simple-index WHEELHOUSE
    compose_checks.py run --runs DIR --rounds N --clients N      (prints the run's directory)
    compose_checks.py ledger --db FILE --run DIR --accountant URL --operator-token FILE
    compose_checks.py prometheus --url URL --at-least N
    compose_checks.py budget-line --log FILE --runs DIR --clients N
    compose_checks.py killed --runs DIR --round N
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sqlite3
import sys
import urllib.parse
import urllib.request
from pathlib import Path


class CheckFailed(Exception):
    pass


def ok(text: str) -> None:
    print(f"compose-ci: ok: {text}", file=sys.stderr)


def require(condition: bool, text: str) -> None:
    if not condition:
        raise CheckFailed(text)


def simple_index(wheelhouse: Path) -> None:
    """A PEP 503 index over a flat directory of wheels (pip in the build reads it over http)."""
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        projects.setdefault(name, []).append(wheel.name)
    root = wheelhouse / "simple"
    for name, files in projects.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        links = "".join(
            f'<a href="../../{urllib.parse.quote(f)}">{html.escape(f)}</a><br>\n' for f in files
        )
        (root / name / "index.html").write_text(
            f"<!DOCTYPE html><html><body>\n{links}</body></html>\n"
        )
    names = "".join(f'<a href="{n}/">{n}</a><br>\n' for n in sorted(projects))
    (root / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{names}</body></html>\n")
    ok(f"simple index of {len(projects)} projects over {wheelhouse}")


def latest_run(runs: Path) -> Path:
    summaries = sorted(runs.glob("*/*/summary.json"), key=lambda p: p.stat().st_mtime)
    require(bool(summaries), f"no summary.json under {runs}")
    return summaries[-1].parent


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_run(runs: Path, rounds: int, clients: int) -> None:
    run = latest_run(runs)
    summary = json.loads((run / "summary.json").read_text())
    require(
        summary["rounds_completed"] == rounds == summary["num_rounds"],
        f"{run}: {summary['rounds_completed']} of {summary['num_rounds']} rounds, wanted {rounds}",
    )
    trained = [r["clients_trained"] for r in rows_of(run)]
    require(trained == [clients] * rounds, f"{run}: clients trained per round {trained}")
    require(not summary.get("clients_out_of_budget"), f"{run}: {summary['clients_out_of_budget']}")
    ok(
        f"{rounds} round(s), {clients} of {clients} clients trained in each, accuracy "
        f"{summary['final_accuracy']:.3f}, epsilon {summary['epsilon_spent']:.3f}, last round "
        f"{rows_of(run)[-1]['wall_time_s']:.0f} s ({run.parent.name}/{run.name})"
    )
    print(run)


def check_ledger(db: Path, run: Path, accountant: str, token_file: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    run_id = summary["run_id"]
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        per_key = con.execute(
            "SELECT client_id, round, COUNT(*) FROM events WHERE run_id = ? "
            "GROUP BY client_id, round",
            (run_id,),
        ).fetchall()
    finally:
        con.close()
    clients = summary["num_clients"]
    want = {(f"client-{i}", r) for i in range(clients) for r in range(1, summary["num_rounds"] + 1)}
    require({(c, r) for c, r, _ in per_key} == want, f"ledger keys {per_key} != {sorted(want)}")
    require(all(n == 1 for _, _, n in per_key), f"more than one event for a key: {per_key}")
    request = urllib.request.Request(
        f"{accountant}/v1/clients",
        headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        served = {c["client_id"]: c for c in json.load(answer)}
    spent = max(float(served[f"client-{i}"]["epsilon_spent"]) for i in range(clients))
    require(
        abs(spent - summary["epsilon_spent"]) <= 1e-9 * max(1.0, spent),
        f"accountant says epsilon {spent}, the summary {summary['epsilon_spent']}",
    )
    ok(f"ledger: one event per client per round ({len(per_key)}), epsilon {spent:.4f} = summary's")


def prometheus_query(url: str, query: str) -> list[dict]:
    params = urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=30) as answer:
        body = json.load(answer)
    require(body.get("status") == "success", f"{query}: {body}")
    return body["data"]["result"]


def check_prometheus(url: str, at_least: int) -> None:
    with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=30) as answer:
        targets = json.load(answer)["data"]["activeTargets"]
    health = {t["labels"]["job"]: t["health"] for t in targets}
    require(health.get("accountant") == "up", f"targets: {health}")
    # The ServerApp's endpoint lives only while a run does: it must have been up during it.
    seen = prometheus_query(url, 'max_over_time(up{job="privfed-server"}[2h])')
    require(bool(seen) and seen[0]["value"][1] == "1", f"privfed-server never up: {seen}")
    reports = prometheus_query(url, "sum(privfed_accountant_reports_total)")
    n = float(reports[0]["value"][1]) if reports else 0.0
    require(n >= at_least, f"privfed_accountant_reports_total = {n}, wanted >= {at_least}")
    ok(f"prometheus: accountant up, the ServerApp was scraped, {n:g} reports counted")


def check_budget_line(log: Path, runs: Path, clients: int) -> None:
    text = log.read_text(errors="replace")
    line = f"{clients} client(s) sat out because their budget is spent"
    require(line in text and "docker compose down -v" in text, f"{log}: no '{line}'")
    summary = json.loads((latest_run(runs) / "summary.json").read_text())
    out = summary["clients_out_of_budget"]
    require(len(out) == clients, f"clients_out_of_budget: {out}")
    ok(f"a second run on spent budgets: {sorted(out)} sat out and submit said how to reset")


def check_killed(runs: Path, rnd: int) -> None:
    run = latest_run(runs)
    summary = json.loads((run / "summary.json").read_text())
    rows = rows_of(run)
    require(summary["rounds_completed"] == summary["num_rounds"], f"{run}: {summary}")
    row = rows[rnd - 1]
    require(
        row["clients_trained"] == 1 and row["clients_failed"] == 1,
        f"round {rnd}: trained {row['clients_trained']}, failed {row['clients_failed']}",
    )
    ok(
        f"a SuperNode killed mid-round {rnd}: the round completed with the other "
        f"(1 trained, 1 failed) in {row['wall_time_s']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    sub.add_parser("simple-index").add_argument("wheelhouse", type=Path)
    p = sub.add_parser("run")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--clients", type=int, required=True)
    p = sub.add_parser("ledger")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--accountant", required=True)
    p.add_argument("--operator-token", type=Path, required=True)
    p = sub.add_parser("prometheus")
    p.add_argument("--url", required=True)
    p.add_argument("--at-least", type=int, required=True)
    p = sub.add_parser("budget-line")
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--clients", type=int, required=True)
    p = sub.add_parser("killed")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--round", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        if args.check == "simple-index":
            simple_index(args.wheelhouse)
        elif args.check == "run":
            check_run(args.runs, args.rounds, args.clients)
        elif args.check == "ledger":
            check_ledger(args.db, args.run, args.accountant, args.operator_token)
        elif args.check == "prometheus":
            check_prometheus(args.url, args.at_least)
        elif args.check == "budget-line":
            check_budget_line(args.log, args.runs, args.clients)
        else:
            check_killed(args.runs, args.round)
    except (CheckFailed, OSError, KeyError, ValueError) as err:
        print(f"compose-ci: FAILED {args.check}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
