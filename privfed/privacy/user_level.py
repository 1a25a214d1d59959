"""User-level DP: DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"), the pure tensor-level part.

The unit protected is a whole device: adding or removing one device changes the sum of the
round's clipped updates by at most ``C`` in L2. Each round

1. the server samples every device independently with probability ``q`` (Poisson sampling,
   from a secret stream: amplification by sampling needs the sample hidden);
2. each sampled device's update ``delta_k = payload_k - payload(global)`` (over everything that
   travels) is clipped to ``C`` (by the server, or by the device and checked by the server);
3. the server releases ``payload(global) + (sum_k clip(delta_k) + N(0, sigma^2 C^2 I)) / (q N)``:
   the fixed-denominator estimator, whose sensitivity does not depend on how many were sampled.
   The noise comes from a fresh secret stream per round, and the release is made even when no
   device was sampled or answered (otherwise an unchanged model would say who was not sampled).

One round is a sampled Gaussian mechanism with rate ``q`` and multiplier ``sigma``
(:class:`~privfed.privacy.events.SampledGaussianEvent`); the run composes ``num_rounds`` of them
for the population, in the population's own ledger. What the server does with the release
afterwards (FedSVD's re-factoring, Fed-SB's mean of R) is post-processing.

The guarantee is central: the server sees the unclipped updates. It holds against everyone who
sees the global model or the run's outputs (other devices, readers of the metrics); record-level
DP-SGD on the devices (``privacy.enabled``) is what holds against the server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from privfed.privacy.events import SampledGaussianEvent
from privfed.randomness import RandomStream
from privfed.tensors import State

POPULATION = "population"  # the ledger's client id for the user-level budget of the run
EVENT_NAME = "dp_fedavg"
CLIENT_CLIP_SLACK = 1e-4  # relative: float32 rounding of a device's own clipping


def update_of(payload: State, reference: State) -> State:
    """``payload - reference`` per tensor, in float64."""
    return {n: payload[n].double() - reference[n].double() for n in reference}


def l2_norm(state: State) -> float:
    """The L2 norm over every coordinate of every tensor."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


def clip(update: State, clip_norm: float) -> State:
    """``update * min(1, C / ||update||)``: the whole update, one factor for every tensor."""
    norm = l2_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: t.double() * factor for n, t in update.items()}


def clipped_payload(payload: State, reference: State, clip_norm: float) -> State:
    """A device's own clipping (``clipping=client``): the payload whose update is clipped."""
    clipped = clip(update_of(payload, reference), clip_norm)
    return {n: (reference[n].double() + clipped[n]).to(payload[n].dtype) for n in reference}


def noised_mean(
    reference: State,
    updates: Sequence[State],
    clip_norm: float,
    noise_multiplier: float,
    expected_devices: float,
    stream: RandomStream,
    server_learning_rate: float = 1.0,
) -> State:
    """The round's release: ``reference + eta (sum clip(u) + N(0, (sigma C)^2)) /
    expected_devices`` with the noise drawn from ``stream`` (a fresh secret stream in a run).
    Every update is clipped here, whoever clipped it before: the sensitivity is ``C`` by
    construction. The server's learning rate ``eta`` scales the released mean update
    (post-processing)."""
    if expected_devices <= 0:
        raise ValueError(f"expected_devices must be > 0, got {expected_devices}")
    std = noise_multiplier * clip_norm
    clipped = [clip(u, clip_norm) for u in updates]
    out: State = {}
    for name, ref in reference.items():
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for update in clipped:
            total += update[name]
        noise = (
            stream.normal(ref.shape, std, dtype=torch.float64)
            if std > 0
            else torch.zeros(ref.shape, dtype=torch.float64)  # a clip-only control
        )
        step = server_learning_rate * (total + noise) / expected_devices
        out[name] = (ref.double() + step).to(ref.dtype)
    return out


def poisson_sample(node_ids: Sequence[int], rate: float, stream: RandomStream) -> list[int]:
    """Each node independently with probability ``rate`` (a secret stream in a run)."""
    ordered = sorted(node_ids)
    picked = stream.bernoulli(len(ordered), rate).tolist() if ordered else []
    return [n for n, keep in zip(ordered, picked, strict=True) if keep]


def round_event(rate: float, noise_multiplier: float) -> SampledGaussianEvent:
    """One round of DP-FedAvg for the population: a sampled Gaussian at the sampling rate."""
    return SampledGaussianEvent(q=rate, sigma=noise_multiplier, steps=1)


# -- adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
#    Clipping") ----------------------------------------------------------------------------------
# Each round the server also releases how many sampled updates were within C, noised, and moves
# C geometrically towards the target quantile of the update norms. The count uses centred bits
# (b - 1/2: sensitivity 1/2) over the same fixed denominator, so together with the update's sum
# (sensitivity C, noise sigma_u C) one round is one Gaussian mechanism of multiplier
# (sigma_u^-2 + (2 sigma_b)^-2)^-1/2 (their Theorem 1): the run is calibrated to that sigma,
# and the update gets the sigma_u that leaves room for the count.


def update_noise_multiplier(sigma: float, count_noise_std: float) -> float:
    """sigma_u with ``(sigma_u^-2 + (2 sigma_b)^-2)^-1/2 = sigma``; needs ``2 sigma_b > sigma``."""
    rest = sigma**-2 - (2.0 * count_noise_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"privacy.user.count_noise_std: {count_noise_std:g} leaves no noise for the update: "
            "adaptive clipping needs 2 * count_noise_std > the round's noise multiplier "
            f"{sigma:.4g}"
        )
    return rest**-0.5


def noised_fraction_within(
    norms: Sequence[float],
    clip_norm: float,
    count_noise_std: float,
    expected_devices: float,
    stream: RandomStream,
) -> float:
    """The released estimate of the fraction of updates with norm <= C:
    ``1/2 + (sum (b_k - 1/2) + N(0, sigma_b^2)) / expected_devices``."""
    centred = sum((1.0 if n <= clip_norm else 0.0) - 0.5 for n in norms)
    noise = float(stream.normal((1,), count_noise_std, dtype=torch.float64))
    return 0.5 + (centred + noise) / expected_devices


def next_clip_norm(
    clip_norm: float, fraction_within: float, target_quantile: float, learning_rate: float
) -> float:
    """The geometric update ``C exp(-eta (b - gamma))``: C shrinks while more than the target
    quantile of updates fit, and grows while fewer do."""
    return clip_norm * math.exp(-learning_rate * (fraction_within - target_quantile))
