"""Secure aggregation (``privacy.user.aggregation=secure``) against central DP-FedAvg.

    python bench/secure_aggregation.py --cost [--devices 10 100 1000] [--dim 75653]
    python bench/secure_aggregation.py --accuracy [--populations 1558] [--epsilons 3 8]
    python bench/secure_aggregation.py --report

1. **Cost per round** (``--cost``): one round of the device and server work of
   privacy/distributed_dg.py and privacy/secagg.py, in this process, with real cryptography, for
   ``n`` devices per round and updates of ``dim`` numbers (default: MiniLM + LoRA's 75,653), 10%
   of them dropping after sharing their keys: CPU seconds per device (its share, its three
   SecAgg+ stages) and on the server (routing nothing: rebuilding the secrets and unmasking),
   bytes each device sends (keys, ciphertexts, the masked vector at ``bits`` per number, its
   shares) against central DP-FedAvg's float32 update, and the extra round trips. Plain SecAgg
   (every device a neighbour) where it is affordable, SecAgg+ with 20 neighbours beside it.
2. **Accuracy at equal epsilon** (``--accuracy``): the user-level study's setting
   (bench/user_frontier.py: the head recipe, q = 0.1, 20 rounds, C and the server learning rate
   its tuning chose on validation for the ``dp`` arm), both aggregations measured in this
   sitting with devices clipping their own updates, evaluation seeds 0, 1, 2, SecAgg+ with 20
   neighbours (``--cost`` shows why not plain SecAgg at 156 devices a round). The secure arm's
   sigma is calibrated on the distributed discrete Gaussian's accounting with half the expected
   devices counted on (``privacy.user.secure.min_survivors=0.5``). Results:
   ``bench/results/secure_aggregation.jsonl`` (resumable, keyed by the composed config).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import frontier  # noqa: E402
import user_frontier  # noqa: E402
from strategies import append, composed, key_of, load  # noqa: E402
from study_stats import paired_difference, t_interval  # noqa: E402

from privfed.privacy import distributed_dg, secagg  # noqa: E402
from privfed.randomness import RandomStream  # noqa: E402

RESULTS = REPO / "bench" / "results" / "secure_aggregation.jsonl"
BITS = 32
NEIGHBOURS = 20


# -- 1. cost per round -----------------------------------------------------------------------
def cost(n: int, dim: int, neighbours: int, dropout: float = 0.1) -> dict[str, float]:
    """One round's device and server CPU seconds and bytes, ``neighbours`` = n - 1: SecAgg."""
    updates = [torch.randn(dim, dtype=torch.float64) * 0.01 for _ in range(n)]
    ids = list(range(1, n + 1))
    graph = secagg.neighbourhoods(ids, neighbours, random.Random(0))
    size = min(neighbours, n - 1) + 1
    threshold = max(2, -(-size // 2))
    device_s: dict[str, float] = defaultdict(float)
    sent: dict[str, int] = defaultdict(int)

    def timed(stage: str, fn, *args):
        t = time.process_time()
        out = fn(*args)
        device_s[stage] += time.process_time() - t
        return out

    shares = {
        d: timed(
            "share",
            distributed_dg.device_share,
            u,
            1.0,
            1e-6,
            0.01,
            0.6,
            BITS,
            RandomStream.secret("r"),
            RandomStream.secret("n"),
        )
        for d, u in zip(ids, updates, strict=True)
    }
    devices = {d: secagg.Device(d, BITS) for d in ids}
    keys = {d: timed("keys", dev.advertise) for d, dev in devices.items()}
    sent["keys"] = 64 * n
    outbox = {
        d: timed("share keys", dev.share_keys, {v: keys[v] for v in graph[d]}, threshold)
        for d, dev in devices.items()
    }
    sent["share keys"] = sum(len(c) + 8 for box in outbox.values() for c in box.values())
    for d in ids:
        timed("masked", devices[d].receive_shares, {s: b[d] for s, b in outbox.items() if d in b})
    gone = set(random.Random(1).sample(ids, int(dropout * n)))
    masked = {d: timed("masked", devices[d].masked_input, shares[d]) for d in ids if d not in gone}
    sent["masked"] = len(masked) * dim * BITS // 8
    revealed = {d: timed("unmask", devices[d].unmask_shares, set(masked), gone) for d in masked}
    sent["unmask"] = sum(len(s) + 8 for r in revealed.values() for s in r.values())
    t = time.process_time()
    total = secagg.unmask_sum(masked, revealed, keys, graph, set(ids), threshold, BITS)
    server_s = time.process_time() - t
    expected = distributed_dg.ring_sum([shares[d] for d in masked], BITS)
    if not torch.equal(total, expected):
        raise AssertionError("secure aggregation summed wrong")
    return {
        "devices": n,
        "neighbours": size - 1,
        "device_s": sum(device_s.values()) / n,
        **{f"device_s_{k}": v / n for k, v in device_s.items()},
        "server_s": server_s,
        "bytes_up": sum(sent.values()) / n,
        "bytes_up_central": dim * 4,
    }


def cost_table(devices: list[int], dim: int) -> None:
    print(
        f"\nsecure aggregation, one round: {dim:,} numbers per update, {BITS}-bit ring, 10% "
        "dropping after sharing keys; CPU s per device (share | SecAgg+ stages) and on the "
        "server; bytes a device sends against central DP-FedAvg's float32 update. Round trips "
        "after training: central 0, secure 3.\n"
    )
    print("| devices | neighbours | device CPU s (share + stages) | server CPU s ", end="")
    print("| bytes up | ÷ central |")
    print("|---|---|---|---|---|---|")
    for n in devices:
        for k in sorted({n - 1, 20} if n > 21 else {n - 1}):
            if k == n - 1 and n > 100:
                continue  # plain SecAgg at 1,000 devices: n^2 masks, out of this machine's reach
            r = cost(n, dim, k)
            stages = r["device_s"] - r["device_s_share"]
            print(
                f"| {n} | {r['neighbours']} | {r['device_s']:.3f} ({r['device_s_share']:.3f} + "
                f"{stages:.3f}) | {r['server_s']:.2f} | {r['bytes_up'] / 1e3:,.0f} kB "
                f"| {r['bytes_up'] / r['bytes_up_central']:.2f} |",
                flush=True,
            )


# -- 2. accuracy at equal epsilon ------------------------------------------------------------
def overrides(population: int, epsilon: float, seed: int, setting: dict, secure: bool) -> list[str]:
    cell = user_frontier.Cell("dp", population, epsilon, seed, tuple(setting.items()), "eval")
    out = [*cell.overrides(), "privacy.user.clipping=client"]
    # SecAgg+ with 20 neighbours: plain SecAgg's Shamir rebuilds at 156 devices a round cost
    # minutes of server time a round here; the neighbourhood changes who must collude, not epsilon
    secure_arm = ["privacy.user.aggregation=secure", f"privacy.user.secure.neighbours={NEIGHBOURS}"]
    return out + (secure_arm if secure else [])


def accuracy(populations: list[int], epsilons: list[float]) -> None:
    study = user_frontier.Study()
    rows = load(RESULTS)
    for n in populations:
        for eps in epsilons:
            chosen = study.tuned("dp", n, eps)
            if chosen is None:
                print(f"N={n} eps={eps}: bench/user_frontier.py has not tuned it; skipped")
                continue
            for seed in user_frontier.EVAL_SEEDS:
                for secure in (False, True):
                    ov = overrides(n, eps, seed, chosen[0], secure)
                    key = key_of(composed(ov))
                    if key in rows:
                        continue
                    arm = "secure" if secure else "central"
                    print(f"N={n} eps={eps} seed={seed} {arm} {chosen[0]}", flush=True)
                    row = frontier.run_overrides(ov, key)
                    if row is None:
                        continue
                    row.update({"arm": arm, "population": n, "epsilon": eps, "seed": seed})
                    append(RESULTS, row)
                    rows[key] = row
                    print(f"  test {row['accuracy']:.3f} in {row['wall_s']:.0f} s", flush=True)


def report() -> str:
    rows = [r for r in load(RESULTS).values() if r.get("accuracy") is not None]
    cells: dict[tuple[int, float], dict[str, dict[int, dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in rows:
        cells[(r["population"], r["epsilon"])][r["arm"]][r["seed"]] = r
    lines = [
        "| N (devices a round) | ε | central: test (σ) | secure: test (σ) | secure − central "
        "(paired by seed) | wall s, central → secure |",
        "|---|---|---|---|---|---|",
    ]
    for (n, eps), arms in sorted(cells.items()):
        central, secure = arms.get("central", {}), arms.get("secure", {})
        seeds = sorted(set(central) & set(secure))
        if not seeds:
            continue

        def show(arm: dict[int, dict[str, Any]], seeds: list[int] = seeds) -> str:
            acc = t_interval([arm[s]["accuracy"] for s in seeds])
            sigma = np.mean([arm[s]["user_noise_multiplier"] for s in seeds])
            return f"{acc.text()} ({sigma:.3f})"

        diff = paired_difference(
            {s: secure[s]["accuracy"] for s in seeds}, {s: central[s]["accuracy"] for s in seeds}
        )
        walls = (
            np.mean([central[s]["wall_s"] for s in seeds]),
            np.mean([secure[s]["wall_s"] for s in seeds]),
        )
        lines.append(
            f"| {n} ({round(0.1 * n)}) | {eps:g} | {show(central)} | {show(secure)} | "
            f"{diff.mean:+.3f} ± {diff.half_width:.3f} (n = {len(seeds)}) "
            f"| {walls[0]:.0f} → {walls[1]:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cost", action="store_true")
    p.add_argument("--devices", nargs="*", type=int, default=[10, 100, 1000])
    p.add_argument("--dim", type=int, default=75_653)
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--populations", nargs="*", type=int, default=user_frontier.POPULATIONS)
    p.add_argument("--epsilons", nargs="*", type=float, default=user_frontier.EPSILONS)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    if args.cost:
        cost_table(args.devices, args.dim)
    if args.accuracy:
        accuracy(args.populations, args.epsilons)
    if args.accuracy or args.report:
        print(report())


if __name__ == "__main__":
    main()
