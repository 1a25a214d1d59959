"""The plan of a secure user-level round (``privacy.user.aggregation=secure``): the numbers every
device needs to make its share, and the event each device and the population record.

Devices clip their whole update to C and add discrete Gaussian shares on a lattice of spacing
gamma (privacy/distributed_dg.py); SecAgg+ sums the shares in Z_(2^bits) (privacy/secagg.py).
A device counts only on the noise of the ``survivors`` guaranteed to survive the round (fewer
abort it), so each adds sigma = z C / sqrt(survivors): their sum has noise std z C, the
noise multiplier z of central DP-FedAvg. Gamma follows the reference implementation's heuristic
(google-research/federated, ``distributed_dp/accounting_utils.heuristic_scale_factor``): k
standard deviations of the sum of up to n devices' values, with n the expected devices plus four
standard deviations of their Poisson count, fit in the ring. That bounds how often the sum wraps
(utility), never the guarantee: the ring's reduction is post-processing of the exact sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from privfed import keys
from privfed.config import RunConfig
from privfed.privacy.events import DistributedDiscreteGaussianEvent


class SecurePlanError(ValueError):
    """The run's secure-aggregation settings cannot make a plan (the ring too small for the
    sum, too few guaranteed survivors): a config error, named by its key."""


@dataclass(frozen=True)
class SecurePlan:
    rate: float  # q: each device's Poisson sampling rate
    clip: float  # C: a device's update's L2 bound
    dim: int  # the update's coordinates
    expected: float  # q N: expected devices per round
    survivors: int  # guaranteed to survive a round: the noise each device counts on
    bits: int
    beta: float
    k_stddevs: float
    noise_multiplier: float  # z: the survivors' noise std over C

    @property
    def sigma(self) -> float:
        """Each device's noise std, in the update's units."""
        return self.noise_multiplier * self.clip / math.sqrt(self.survivors)

    @property
    def gamma(self) -> float:
        """The lattice spacing: k standard deviations of the sum fit in the ring."""
        n = max(self.survivors, math.ceil(self.expected + 4 * math.sqrt(self.expected)))
        room = 2.0 ** (2 * self.bits) - n * self.k_stddevs**2
        if room <= 0:
            raise SecurePlanError(
                f"privacy.user.secure.bits: {self.bits} bits cannot hold {n} devices' sum at "
                f"k_stddevs={self.k_stddevs:g}; raise bits"
            )
        spread = math.sqrt(self.clip**2 * n**2 / self.dim + n * self.sigma**2)
        return 2 * self.k_stddevs * spread / math.sqrt(room)

    def event(self, count: int = 1) -> DistributedDiscreteGaussianEvent:
        return DistributedDiscreteGaussianEvent(
            q=self.rate,
            clip=self.clip,
            gamma=self.gamma,
            sigma=self.sigma,
            devices=self.survivors,
            dim=self.dim,
            beta=self.beta,
            count=count,
        )

    def entries(self) -> dict[str, float | int]:
        """What a secure round's config carries (keys.SECAGG_PLAN), for the devices."""
        values = (self.rate, self.clip, self.gamma, self.sigma, self.beta, self.bits)
        return dict(zip(keys.SECAGG_PLAN, (*values, self.survivors), strict=True))


def survivors(cfg: RunConfig, rate: float) -> int:
    """Devices guaranteed to survive a round: the configured share of the expected devices
    (``rate``: the devices' sampling rate, calibration.user_sampling_rate)."""
    expected = rate * cfg.federation.num_clients
    n = math.floor(cfg.privacy.user.secure.min_survivors * expected)
    if n < 2:
        raise SecurePlanError(
            f"privacy.user.secure.min_survivors: {cfg.privacy.user.secure.min_survivors:g} of "
            f"{expected:g} expected devices per round is {n}; secure aggregation needs >= 2"
        )
    return n


def secure_plan(cfg: RunConfig, rate: float, dim: int, noise_multiplier: float) -> SecurePlan:
    """The plan at noise multiplier z for devices sampled at ``rate`` with ``dim``-coordinate
    updates."""
    secure = cfg.privacy.user.secure
    return SecurePlan(
        rate=rate,
        clip=cfg.privacy.user.clip_norm,
        dim=dim,
        expected=rate * cfg.federation.num_clients,
        survivors=survivors(cfg, rate),
        bits=secure.bits,
        beta=secure.beta,
        k_stddevs=secure.k_stddevs,
        noise_multiplier=noise_multiplier,
    )


def device_event(entries: dict, dim: int) -> DistributedDiscreteGaussianEvent:
    """On a device: the event of this round's plan (as the server sent it) for its own update
    of ``dim`` coordinates; its ranges are checked as any event's. ValueError names a bad key."""
    values = []
    for key in keys.SECAGG_PLAN:
        value = entries.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"record key {key!r}: a number expected, got {value!r}")
        values.append(value)
    rate, clip, gamma, sigma, beta, _, survivors_ = values  # SecurePlan.entries' order
    return DistributedDiscreteGaussianEvent(
        q=float(rate),
        clip=float(clip),
        gamma=float(gamma),
        sigma=float(sigma),
        devices=int(survivors_),
        dim=dim,
        beta=float(beta),
    )
