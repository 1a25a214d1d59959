"""The white-box auditor: an adversary that knows everything the server knows.

The server has the run's whole config: its seed, every client's id and round, sigma, C, the
trainable shapes. Whatever a client draws *from those* the server can draw again. This auditor
does exactly that for the DP-SGD noise: for each (client, round) it regenerates the noise stream
that the config determines (:func:`privfed.privacy.dp_sgd.config_derived_noise`), in the order
the mechanism draws it (every step, every trainable tensor, :func:`step_noise`), and subtracts
its value at each canary's coordinate from what the client released there.

Against the real mechanism, whose noise comes from a fresh secret stream, the regenerated draws
are independent of the real ones: the subtraction only adds noise, and the audit passes. If the
noise were a function of the config (the bug this auditor was written for, kept as
``audit.break_mechanism=known_noise``), the subtraction leaves the clipped sums bare, the
canaries stand out, and the audit fails.
"""

from __future__ import annotations

import numpy as np

from privfed.audit.canaries import CanaryPlan
from privfed.privacy.dp_sgd import config_derived_noise
from privfed.privacy.opacus_streams import step_noise


def regenerated_noise(
    seed: int,
    partition_id: int,
    server_round: int,
    ids: np.ndarray,
    plan: CanaryPlan,
    numels: list[int],
    noise_std: float,
    steps: int,
) -> np.ndarray:
    """The round's noise summed over its steps at each canary's coordinate, as a server that
    re-creates the config-derived stream of (client, round) would predict it."""
    tensor, offset = plan.coordinates(numels)
    stream = config_derived_noise(seed, partition_id, server_round)
    shapes = [(n,) for n in numels]
    total = np.zeros(len(ids))
    for _ in range(steps):
        noise = step_noise(stream, shapes, noise_std)
        total += np.array([float(noise[tensor[j]][offset[j]]) for j in ids])
    return total
