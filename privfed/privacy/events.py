"""Privacy events: immutable records of one privacy-consuming release.

Modelled on dp-accounting's ``dp_event.py``: an event says *what* was released, never how much
epsilon it cost; the accountant derives epsilon from events (the ledger stores events, not
epsilon). Every event has an RDP curve over :data:`ORDERS`.

Neighbouring relation: record-level, add/remove one example of one client's local dataset
(the relation under which Poisson-subsampled Gaussian RDP bounds hold; Mironov et al. 2019).

Every field is range-checked when an event is built, so that pricing an event (computing its
curve) always succeeds in bounded time and memory: the accountant service prices whatever a
client sends. The ranges, and why nothing outside them is meaningful:

* ``sigma`` in [1e-10, 1e10]: below, one step's RDP exceeds 10^19 at every order (nothing
  left to protect) and sigma^2 heads for float64 underflow; above, one step costs under 10^-17;
* ``q`` in (0, 1]; ``steps`` and ``count`` in [1, 10^7];
* RQM: ``m`` <= 64 levels and ``delta / c`` in [1e-6, 1e6] (privacy/rqm_accounting.py),
  ``dims`` <= 10^10;
* ``rdp_curve``: at most 1,024 orders, at least one of them an accountant order, and finite
  values >= 0 (an accountant order the curve leaves out counts as infinite: no bound there).

Nothing here imports torch or Opacus (the formulas are in privacy/rdp.py and
privacy/rqm_accounting.py), so the accountant service starts in about a second.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from privfed.privacy.rdp import gaussian_rdp, sampled_gaussian_rdp
from privfed.privacy.rqm_accounting import check_accountable, rdp_per_coordinate

# dp-accounting's default RDP orders (rdp_privacy_accountant.DEFAULT_RDP_ORDERS): 1.1 ... 10.9 in
# steps of 0.1, 11 ... 63, then 128, 256, 512, 1024. The fractional orders below 2 are where small
# budgets are decided (epsilon ~ 1), and with them RDP figures equal dp-accounting's to rounding.
# Opacus 1.6 computes fractional orders with the same series but stops it on an absolute e^-30,
# so it can differ from both (up to 7% at alpha = 1.1, q = 0.01, sigma = 1; privacy/rdp.py).
ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10.0 for x in range(1, 100))
    + tuple(float(a) for a in range(11, 64))
    + (128.0, 256.0, 512.0, 1024.0)
)

MAX_STEPS = 10_000_000  # a sanity bound on one event's step count
SIGMA_RANGE = (1e-10, 1e10)
MAX_DIMS = 10**10
MAX_CURVE_ORDERS = 1024


class PrivacyEvent:
    """Base class: an immutable, serialisable privacy event with an RDP curve."""

    kind: ClassVar[str]

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        raise NotImplementedError

    def to_json(self) -> str:
        # Kept on the (immutable) event: a service report asks for it at every step (its curve,
        # its compositions, its pending entry, the commit). Not a field: eq and hash ignore it.
        text = self.__dict__.get("_json")
        if text is None:
            # fields() rather than asdict(): no deep copy of the (flat) values, 5x faster
            values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
            text = self.__dict__["_json"] = json.dumps(
                {"kind": self.kind, **values}, sort_keys=True
            )
        return text


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
        _check_sigma(self.sigma)
        _check_steps(self.steps)

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        return self.steps * sampled_gaussian_rdp(float(self.q), float(self.sigma), orders)


@dataclass(frozen=True)
class GaussianEvent(PrivacyEvent):
    """``count`` compositions of the Gaussian mechanism with noise multiplier ``sigma``
    (noise std / L2 sensitivity), without sampling: RDP(alpha) = alpha / (2 sigma^2)."""

    sigma: float
    count: int = 1
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _check_sigma(self.sigma)
        _check_steps(self.count)

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        return self.count * gaussian_rdp(float(self.sigma), orders)


@dataclass(frozen=True)
class RdpCurveEvent(PrivacyEvent):
    """A generic event given by its RDP curve over the accountant's orders."""

    orders: tuple[float, ...]
    values: tuple[float, ...]
    kind: ClassVar[str] = "rdp_curve"

    def __post_init__(self) -> None:
        if len(self.orders) != len(self.values):
            raise ValueError("rdp_curve: orders and values differ in length")
        if len(self.orders) > MAX_CURVE_ORDERS:
            raise ValueError(f"rdp_curve: at most {MAX_CURVE_ORDERS} orders")
        if any(
            not isinstance(v, int | float) or not math.isfinite(v) or v < 0 for v in self.values
        ):
            raise ValueError("rdp_curve: values must be finite and >= 0")
        if not set(ORDERS) & set(self.orders):
            raise ValueError(
                "rdp_curve: orders must include at least one accountant order (privacy/events.py "
                f"ORDERS: {ORDERS[0]:g} ... {ORDERS[-1]:g})"
            )

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        # An order the curve does not give has no bound: infinite, so that order is never used.
        lookup = dict(zip(self.orders, self.values, strict=True))
        return np.asarray([lookup.get(a, math.inf) for a in orders], dtype=np.float64)


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
        check_accountable(self.c, self.delta, self.m, self.q, self.sensitivity)
        if not (isinstance(self.dims, int) and 1 <= self.dims <= MAX_DIMS):
            raise ValueError(f"dims must be an integer in [1, {MAX_DIMS}], got {self.dims!r}")
        _check_steps(self.count)

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
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


def _check_sigma(value: float) -> None:
    low, high = SIGMA_RANGE
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"sigma must be in [{low:g}, {high:g}], got {value!r}")


def _check_steps(value: int) -> None:
    if not (isinstance(value, int) and 1 <= value <= MAX_STEPS):
        raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {value!r}")
