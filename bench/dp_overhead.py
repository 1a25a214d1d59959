"""DP-SGD overhead on the default model and batch: step time and peak memory, DP / non-private.

    python bench/dp_overhead.py [--steps 8] [--repeats 3] [model=... overrides]

Each mode runs in its own subprocess (so peak RSS is its own), the modes alternate
``--repeats`` times (the machine is shared and noisy: compare within one run), and the script
prints median step times and the ratios. A step is one logical batch of
``train.physical_batch_size`` examples: forward, backward, (per-sample clipping, noise), update.
Modes: ``none`` (non-private), ``flat`` and ``per_layer`` (privfed's optimizer: Opacus' with its
noise from a secret ChaCha20 stream), and ``flat_torch_rng`` (Opacus' optimizer with its own
noise from a seeded torch generator, as privfed drew it before: what the secret stream costs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("none", "flat", "per_layer", "flat_torch_rng")


def worker(mode: str, steps: int, overrides: list[str]) -> dict:
    import torch
    from opacus.grad_sample.utils import wrap_model
    from opacus.optimizers import get_optimizer_class

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from privfed.data.federated import federated_data
    from privfed.models.backbone import forward_logits, fresh_model
    from privfed.privacy.dp_sgd import per_layer_bounds
    from privfed.privacy.opacus_streams import dp_optimizer
    from privfed.randomness import RandomStream
    from tests.helpers import run_config

    cfg = run_config(*overrides)
    torch.set_num_threads(int(cfg.federation.client_resources.num_cpus))
    data = federated_data(cfg)
    model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size)
    model.train()
    batch = cfg.train.physical_batch_size
    ids, mask, labels = (
        data.train.input_ids[:batch],
        data.train.attention_mask[:batch],
        data.train.labels[:batch],
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.train.learning_rate)
    net = model
    if mode != "none":
        net = wrap_model(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
        bound = (
            per_layer_bounds([p.shape for p in params], cfg.privacy)
            if mode == "per_layer"
            else cfg.privacy.max_grad_norm
        )
        if mode == "flat_torch_rng":
            optimizer = get_optimizer_class("flat", False, "hooks")(
                optimizer,
                noise_multiplier=1.0,
                max_grad_norm=bound,
                expected_batch_size=batch,
                generator=torch.Generator().manual_seed(0),
            )
        else:
            optimizer = dp_optimizer(
                optimizer,
                clipping=mode,
                grad_sample_mode="hooks",
                noise_multiplier=1.0,
                max_grad_norm=bound,
                expected_batch_size=batch,
                noise_stream=RandomStream.secret("dp_sgd.noise"),
            )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward_logits(net, ids, mask), labels).backward()
        optimizer.step()

    step()  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "mode": mode,
        "step_s": statistics.median(times),
        "peak_rss_mb": peak / 1024,
        "rss_before_mb": rss_before / 1024,
    }
    if mode == "flat":  # the noise draw alone, one step's worth: secret stream vs torch
        from privfed.privacy.opacus_streams import step_noise

        shapes = [p.shape for p in params]
        stream, gen = RandomStream.secret("bench"), torch.Generator().manual_seed(0)

        def timed(draw) -> float:
            runs = []
            for _ in range(20):
                t0 = time.perf_counter()
                draw()
                runs.append(time.perf_counter() - t0)
            return statistics.median(runs)

        out["noise_secret_s"] = timed(lambda: step_noise(stream, shapes, 1.0))
        out["noise_torch_s"] = timed(
            lambda: [torch.normal(0, 1.0, s, generator=gen) for s in shapes]
        )
        out["coordinates"] = sum(p.numel() for p in params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=MODES)
    args, overrides = parser.parse_known_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, overrides)))
        return
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        for mode in MODES:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    mode,
                    "--steps",
                    str(args.steps),
                    *overrides,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[mode].append(res)
            print(
                f"  repeat {rep + 1}/{args.repeats} {mode:9s} {res['step_s']:.3f} s/step "
                f"peak RSS {res['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    med = {m: statistics.median(r["step_s"] for r in results[m]) for m in MODES}
    peak = {m: statistics.median(r["peak_rss_mb"] for r in results[m]) for m in MODES}
    print(
        f"{'mode':14s} {'s/step':>8s} {'time ratio':>11s} {'peak RSS MB':>12s} "
        f"{'memory ratio':>13s}"
    )
    for m in MODES:
        print(
            f"{m:14s} {med[m]:8.3f} {med[m] / med['none']:11.3f} {peak[m]:12.0f} "
            f"{peak[m] / peak['none']:13.3f}"
        )
    print(
        f"secret noise (flat) / torch generator noise (flat_torch_rng): "
        f"{med['flat'] / med['flat_torch_rng']:.3f} time per step"
    )
    secret = statistics.median(r["noise_secret_s"] for r in results["flat"])
    torch_rng = statistics.median(r["noise_torch_s"] for r in results["flat"])
    print(
        f"one step's noise ({results['flat'][0]['coordinates']:,} coordinates): secret stream "
        f"{secret * 1e3:.1f} ms, torch generator {torch_rng * 1e3:.1f} ms; the secret draw is "
        f"{secret / med['flat']:.1%} of a flat DP step"
    )


if __name__ == "__main__":
    main()
