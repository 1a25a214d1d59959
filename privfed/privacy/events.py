"""Privacy events: immutable records of one privacy-consuming release.

Modelled on dp-accounting's ``dp_event.py``: an event says *what* was released, never how much
epsilon it cost; the accountant derives epsilon from events (the ledger stores events, not
epsilon). Every event has an RDP curve over :data:`ORDERS`.

Neighbouring relation: record-level, add/remove one example of one client's local dataset
(the relation under which Poisson-subsampled Gaussian RDP bounds hold; Mironov et al. 2019).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp

# Integer RDP orders 2 ... 64 plus 128, 256, 512 (ALGORITHMS.md "Accounting"). Fractional orders
# are left out on purpose: for the sampled Gaussian at fractional alpha, Opacus 1.6 and
# dp-accounting 0.6 disagree by up to 7% (alpha = 1.1, q = 0.01, sigma = 1; dp-accounting
# interpolates, the larger value), while at integer orders both are exact and agree to 1e-13.
ORDERS: tuple[float, ...] = tuple(float(a) for a in range(2, 65)) + (128.0, 256.0, 512.0)

MAX_STEPS = 10_000_000  # a sanity bound on one event's step count


class PrivacyEvent:
    """Base class: an immutable, serialisable privacy event with an RDP curve."""

    kind: ClassVar[str]

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        raise NotImplementedError

    def to_json(self) -> str:
        # fields() rather than asdict(): no deep copy of the (flat) values, 5x faster
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return json.dumps({"kind": self.kind, **values}, sort_keys=True)


@dataclass(frozen=True)
class SampledGaussianEvent(PrivacyEvent):
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism (DP-SGD).

    Each example is included in a step's batch independently with probability ``q``; the sum of
    clipped per-example gradients (L2 bound C) gets N(0, (sigma C)^2) noise.
    """

    q: float
    sigma: float
    steps: int
    kind: ClassVar[str] = "sampled_gaussian"

    def __post_init__(self) -> None:
        _check_prob("q", self.q)
        _check_positive("sigma", self.sigma)
        _check_steps(self.steps)

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        return np.asarray(
            opacus_rdp.compute_rdp(
                q=self.q, noise_multiplier=self.sigma, steps=self.steps, orders=list(orders)
            ),
            dtype=np.float64,
        )


@dataclass(frozen=True)
class GaussianEvent(PrivacyEvent):
    """``count`` compositions of the Gaussian mechanism with noise multiplier ``sigma``
    (noise std / L2 sensitivity), without sampling: RDP(alpha) = alpha / (2 sigma^2)."""

    sigma: float
    count: int = 1
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _check_positive("sigma", self.sigma)
        _check_steps(self.count)

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        a = np.asarray(orders, dtype=np.float64)
        return self.count * a / (2.0 * self.sigma**2)


@dataclass(frozen=True)
class RdpCurveEvent(PrivacyEvent):
    """A generic event given by its RDP curve over the accountant's orders."""

    orders: tuple[float, ...]
    values: tuple[float, ...]
    kind: ClassVar[str] = "rdp_curve"

    def __post_init__(self) -> None:
        if len(self.orders) != len(self.values):
            raise ValueError("rdp_curve: orders and values differ in length")
        if any(not math.isfinite(v) or v < 0 for v in self.values):
            raise ValueError("rdp_curve: values must be finite and >= 0")

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        lookup = dict(zip(self.orders, self.values, strict=True))
        missing = [a for a in orders if a not in lookup]
        if missing:
            raise ValueError(f"rdp_curve: missing RDP orders {missing[:3]}...")
        return np.asarray([lookup[a] for a in orders], dtype=np.float64)


@dataclass(frozen=True)
class RQMEvent(PrivacyEvent):
    """``count`` releases of RQM (privacy/rqm.py) on ``dims`` coordinates, each in
    ``[-c, c]`` and changed by at most ``sensitivity`` by one record (an L-infinity bound, so one
    record can change all of them: the per-coordinate curve times ``dims``)."""

    c: float
    delta: float
    m: int
    q: float
    sensitivity: float
    dims: int
    count: int = 1
    kind: ClassVar[str] = "rqm"

    def __post_init__(self) -> None:
        _check_positive("c", self.c)
        _check_positive("delta", self.delta)
        _check_positive("sensitivity", self.sensitivity)
        _check_prob("q", self.q)
        if not (isinstance(self.m, int) and 2 <= self.m <= 256):
            raise ValueError(f"m must be an integer in [2, 256], got {self.m!r}")
        if not (isinstance(self.dims, int) and 1 <= self.dims <= 10**10):
            raise ValueError(f"dims must be a positive integer, got {self.dims!r}")
        _check_steps(self.count)

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        from privfed.privacy.rqm import rdp_per_coordinate

        per = rdp_per_coordinate(
            float(self.c),
            float(self.delta),
            self.m,
            float(self.q),
            float(self.sensitivity),
            tuple(orders),
        )
        return self.dims * self.count * per


EVENT_TYPES: dict[str, type[PrivacyEvent]] = {
    cls.kind: cls for cls in (SampledGaussianEvent, GaussianEvent, RdpCurveEvent, RQMEvent)
}


def event_from_json(text: str) -> PrivacyEvent:
    """Rebuild an event from :meth:`PrivacyEvent.to_json` output (validates its fields)."""
    data: dict[str, Any] = json.loads(text)
    kind = data.pop("kind", None)
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown privacy event kind {kind!r}")
    if kind == "rdp_curve":
        data = {"orders": tuple(data["orders"]), "values": tuple(data["values"])}
    return EVENT_TYPES[kind](**data)


def _check_prob(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_steps(value: int) -> None:
    if not (isinstance(value, int) and 1 <= value <= MAX_STEPS):
        raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {value!r}")
