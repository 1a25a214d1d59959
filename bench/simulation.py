"""Simulation throughput and memory, from real federations run through the CLI.

    python bench/simulation.py [--rounds 3] [--skip-efficiency] [--skip-memory]
    python bench/simulation.py --scale [10 100 1000]
    python bench/simulation.py --scale 100 1000 --model minilm --rounds 2

1. Orchestration efficiency at 10 clients (default model and data, ``privacy=none``: under DP
   a client reports no timing, which would be a side channel):
   ``(sum of client training times / parallel workers) / round wall time`` per round; 1.0 means
   Ray and Flower add nothing to the clients' own work. Round 1 includes starting the actors.
2. Clients per machine: a 200-client federation (10 sampled per round, tiny model) and the
   resident memory of the whole process tree (server + Ray + actors) after every round; the
   slope over the later rounds shows whether memory grows round over round.
3. Cross-device scale (``--scale``): 1,000 clients, tiny model, ``privacy=none``, with 10, 100
   and 1,000 of them per round. Per round after the first (which starts the actors): the round's
   wall time, the clients' own compute over the parallel workers, and what is left per client
   message (the orchestration cost: Flower, Ray, serialisation, the server's aggregation), with
   the process tree's memory; then how both grow from 10 to 1,000 clients per round.
   Target: at most 20 ms of orchestration per client message here.
   With ``--model minilm``: MiniLM under record-level DP (the default privacy), 1-2 examples per
   client, in one sitting: the model built per call (``federation.reuse_client_model=false``,
   as at first), once per worker (one actor call per client), and bundled (several waiting
   clients per actor call, ``federation.messages_per_call=8``, privfed/simulation_bundling.py),
   with each client's durable writes flushed on their own or (the default) once per call
   (``federation.flush_per_call``, privfed/privacy/durability.py).
   Each client call writes its forward/backward seconds on the device
   (``PRIVFED_CLIENT_PROFILE``, telemetry/client_profile.py; never in a reply); the fixed cost
   per client is (round wall - that compute / workers) / clients, and "in call" the part of it
   inside the client calls (the rest is Ray, Flower and the server).
4. Message delivery (``--delivery``): one sweep of Flower's simulation-engine delivery loop
   (``get_message_ins`` per node) against privfed's one pass (privfed/simulation_delivery.py),
   on Flower's real in-memory link state with 1,000 nodes and 10, 100 and 1,000 messages in
   flight, timed alternately in this process; the figure is the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def run(overrides: list[str], env: dict[str, str] | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "privfed.cli",
            f"hydra.run.dir={tmp}/run",
            "telemetry.plot=false",
            *overrides,
        ]
        env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
        print("$ privfed " + " ".join(overrides), file=sys.stderr)
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = [
            json.loads(line)
            for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        cfg = (Path(tmp) / "run" / "config.yaml").read_text()
    rows.append({"config": cfg})
    return rows


def efficiency(rounds: int) -> None:
    rows = run([f"num_rounds={rounds}", "privacy=none"])[:-1]
    workers = min(os.cpu_count() or 1, 10)  # Ray CPUs / 1 CPU per client, at most the clients
    print(f"\norchestration efficiency, 10 clients, {workers} parallel workers")
    print(f"{'round':>5s} {'wall s':>8s} {'sum client s':>13s} {'efficiency':>11s}")
    for r in rows:
        eff = r["client_train_time_s"] / workers / r["train_time_s"]
        print(
            f"{r['round']:5d} {r['train_time_s']:8.1f} {r['client_train_time_s']:13.1f} {eff:11.3f}"
        )
    later = [r["client_train_time_s"] / workers / r["train_time_s"] for r in rows[1:]]
    if later:
        print(f"steady state (rounds 2..{rounds}): {np.mean(later):.3f}")


def memory(rounds: int) -> None:
    rows = run(
        [
            "model=tiny_bert",
            "federation.num_clients=200",
            "federation.clients_per_round=10",
            f"num_rounds={rounds}",
            "train.batch_size=16",
            "train.physical_batch_size=16",
        ]
    )[:-1]
    rss = np.array([r["memory_rss_mb"] for r in rows])
    print(
        "\n200 clients, 10 per round: process-tree RSS per round (MB): "
        + " ".join(f"{x:.0f}" for x in rss)
    )
    later = rss[1:]
    slope = np.polyfit(np.arange(len(later)), later, 1)[0] if len(later) > 1 else 0.0
    print(
        f"slope over rounds 2..{rounds}: {slope:+.1f} MB/round "
        f"({slope / later.mean() * 100:+.2f}% of the mean per round); "
        f"last / round 2: {rss[-1] / rss[1]:.3f}"
    )


def scale(rounds: int, per_round: list[int]) -> None:
    workers = os.cpu_count() or 1  # Ray CPUs here, 1 CPU per client
    print(
        f"\ncross-device scale: 1,000 clients (tiny model, privacy=none), {workers} workers;"
        f" rounds 2..{rounds}"
    )
    print(
        f"{'per round':>9s} {'round s':>8s} {'compute s':>10s} {'orch. s':>8s} "
        f"{'ms / message':>13s} {'RSS MB':>8s}"
    )
    found = {}
    for k in per_round:
        rows = run(
            [
                "model=tiny_bert",
                "federation.num_clients=1000",
                f"federation.clients_per_round={k}",
                f"num_rounds={rounds}",
                "privacy=none",
            ]
        )[:-1]
        later = rows[1:] or rows
        wall = float(np.mean([r["train_time_s"] for r in later]))
        compute = float(np.mean([r["client_train_time_s"] for r in later])) / workers
        trained = float(np.mean([r["clients_trained"] for r in later]))
        orchestration = max(0.0, wall - compute)
        per_message = orchestration / trained * 1e3
        rss = float(np.mean([r["memory_rss_mb"] for r in later]))
        found[k] = (per_message, rss)
        print(
            f"{k:9d} {wall:8.2f} {compute:10.2f} {orchestration:8.2f} "
            f"{per_message:13.1f} {rss:8.0f}"
        )
    ks = sorted(found)
    if len(ks) > 1:
        lo, hi = ks[0], ks[-1]
        print(
            f"from {lo} to {hi} clients per round ({hi / lo:.0f}x): orchestration per message "
            f"x{found[hi][0] / max(found[lo][0], 1e-9):.2f}, process-tree memory "
            f"x{found[hi][1] / found[lo][1]:.2f}"
        )


# Part 3 on MiniLM: how client calls ran, in the order they came to privfed.
MINILM_VARIANTS = {
    "per call": ["federation.reuse_client_model=false", "federation.messages_per_call=1"],
    "per worker": ["federation.reuse_client_model=true", "federation.messages_per_call=1"],
    "bundled, flush each": [
        "federation.reuse_client_model=true",
        "federation.messages_per_call=8",
        "federation.flush_per_call=false",
    ],
    "bundled": ["federation.reuse_client_model=true", "federation.messages_per_call=8"],
    "bundled 16": ["federation.reuse_client_model=true", "federation.messages_per_call=16"],
}


def round_parts(calls: list[dict], row: dict, workers: int) -> dict[str, float]:
    """One round's forward/backward seconds per worker ("compute_s"), and its fixed cost per
    client in ms, in parts: inside the client calls, each worker between its calls, and the
    server around them (client_profile.gaps_and_margin)."""
    from privfed.telemetry.client_profile import gaps_and_margin

    own = [c for c in calls if c["round"] == row["round"]]
    per_client_ms = 1e3 / row["clients_trained"]
    gaps, margin = gaps_and_margin(own, row["train_time_s"])
    return {
        "compute_s": sum(c["compute_s"] for c in own) / workers,
        "in call": sum(c["call_s"] - c["compute_s"] for c in own) / workers * per_client_ms,
        "between": gaps / workers * per_client_ms,
        "server": margin * per_client_ms,
    }


def scale_minilm(rounds: int, per_round: list[int], variants: list[str]) -> None:
    """Part 3 on MiniLM under record-level DP: the fixed cost of a client call with the model
    built per call, once per worker, and with several clients per actor call, in one sitting."""
    from privfed.telemetry.client_profile import PROFILE_ENV, read_profiles

    workers = os.cpu_count() or 1
    print(
        f"\ncross-device scale, MiniLM: 1,000 clients (1-2 examples each), record-level DP, "
        f"{workers} workers; rounds 2..{rounds}. fixed = (round wall - forward/backward "
        "compute / workers) / clients = in call + between calls + server, each per client"
    )
    head = (
        "per round",
        "model",
        "round s",
        "compute s",
        "fixed ms",
        "in call ms",
        "between ms",
        "server ms",
        "devices/s",
        "RSS MB",
    )
    print(" ".join(f"{h:>10s}" for h in head))
    found: dict[tuple[int, str], tuple[float, float]] = {}
    for k in per_round:
        for label in variants:
            with tempfile.TemporaryDirectory() as profiles:
                rows = run(
                    [
                        "federation.num_clients=1000",
                        f"federation.clients_per_round={k}",
                        f"num_rounds={rounds}",
                        *MINILM_VARIANTS[label],
                        "eval.test=false",
                    ],
                    env={PROFILE_ENV: profiles},
                )[:-1]
                calls = read_profiles(Path(profiles))
            later = rows[1:] or rows
            parts = [round_parts(calls, r, workers) for r in later]
            wall = float(np.mean([r["train_time_s"] for r in later]))
            trained = float(np.mean([r["clients_trained"] for r in later]))
            compute = float(np.mean([p["compute_s"] for p in parts]))
            per_client_ms = (wall - compute) / trained * 1e3
            in_call, between, server = (
                float(np.mean([p[x] for p in parts])) for x in ("in call", "between", "server")
            )
            rss = float(np.mean([r["memory_rss_mb"] for r in later]))
            found[(k, label)] = (per_client_ms, trained / wall)
            print(
                f"{k:10d} {label:>10s} {wall:10.1f} {compute:10.1f} "
                f"{per_client_ms:10.1f} {in_call:10.1f} {between:10.1f} "
                f"{server:10.1f} {trained / wall:10.1f} "
                f"{rss:10.0f}"
            )
    first = variants[0]
    for k, label in itertools.product(per_round, variants[1:]):
        before, after = found[(k, first)], found[(k, label)]
        print(
            f"{k} per round, {label} / {first}: fixed cost per client "
            f"x{after[0] / before[0]:.2f}, devices per second x{after[1] / before[1]:.2f}"
        )


def flower_federation(num_nodes: int):
    """Flower's in-memory link state and grid with a run and ``num_nodes`` nodes, set up the way
    ``flwr.simulation.run_simulation`` sets them up (this process's task identity included).
    Also the tests' federation (tests/unit/test_simulation_delivery.py)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id = 11
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    nodes = vce_api._register_nodes(num_nodes=num_nodes, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def delivery(num_nodes: int = 1000, in_flight: tuple[int, ...] = (10, 100, 1000)) -> None:
    """Seconds per sweep when every message in flight has been delivered already (the state
    of a round while the clients train: what the loop pays every 0.1 s), and per sweep that
    delivers them all (once per round)."""
    import time

    from flwr.app import Message, RecordDict

    from privfed.simulation_delivery import deliver_pending

    def flower_sweep(state, nodes) -> int:  # one pass of vce_api.add_messages_to_queue
        return sum(len(state.get_message_ins(node_id=n, limit=1)) for n in nodes)

    def one_pass(state, nodes) -> int:
        return len(deliver_pending(state, nodes))

    print(f"\nmessage delivery, {num_nodes} nodes: seconds per sweep (Flower / one pass)")
    head = (
        ("in flight", 9),
        ("idle sweep", 23),
        ("ratio", 7),
        ("delivering sweep", 23),
        ("ratio", 7),
    )
    print(" ".join(f"{name:>{width}s}" for name, width in head))
    for k in in_flight:
        timings: dict[str, list[float]] = {"flower": [], "one": [], "flower_d": [], "one_d": []}
        for _ in range(3):  # alternate, so that the machine's load falls on both alike
            for name, sweep in (("flower", flower_sweep), ("one", one_pass)):
                state, grid, nodes = flower_federation(num_nodes)
                node_ids = list(nodes)[:k]
                grid.push_messages(
                    [Message(RecordDict(), dst_node_id=n, message_type="train") for n in node_ids]
                )
                started = time.perf_counter()
                assert sweep(state, nodes) == k
                timings[name + "_d"].append(time.perf_counter() - started)
                started = time.perf_counter()
                assert sweep(state, nodes) == 0
                timings[name].append(time.perf_counter() - started)
        f, o = min(timings["flower"]), min(timings["one"])
        fd, od = min(timings["flower_d"]), min(timings["one_d"])
        print(f"{k:9d} {f:10.4f} / {o:10.6f} {f / o:7.0f}x {fd:10.4f} / {od:10.6f} {fd / od:7.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-rounds", type=int, default=10)
    parser.add_argument("--skip-efficiency", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--scale", nargs="*", type=int, help="only part 3, at these clients per round (10 100 1000)"
    )
    parser.add_argument(
        "--model",
        choices=["tiny_bert", "minilm"],
        default="tiny_bert",
        help="with --scale: minilm runs part 3 on MiniLM under DP, before and after",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=list(MINILM_VARIANTS),
        default=["per call", "per worker", "bundled"],
        help="with --model minilm: how client calls run (ratios are against the first)",
    )
    parser.add_argument("--delivery", action="store_true", help="only part 4")
    args = parser.parse_args()
    if args.delivery:
        delivery()
        return
    if args.scale is not None and args.model == "minilm":
        scale_minilm(args.rounds, args.scale or [100, 1000], args.variants)
        return
    if args.scale is not None:
        scale(args.rounds, args.scale or [10, 100, 1000])
        return
    if not args.skip_efficiency:
        efficiency(args.rounds)
    if not args.skip_memory:
        memory(args.memory_rounds)


if __name__ == "__main__":
    main()
