"""Privacy events: immutable records of one privacy-consuming release.

Modelled on dp-accounting's ``dp_event.py``: an event says *what* was released, never how much
epsilon it cost; the accountant derives epsilon from events (the ledger stores events, not
epsilon). Every event has an RDP curve over :data:`ORDERS`.

Neighbouring relation: record-level, add/remove one example of one client's local dataset
(the relation under which Poisson-subsampled Gaussian RDP bounds hold; Mironov et al. 2019).

Each event is specified once, here: a pydantic dataclass whose field types carry their ranges.
The library builds events from it, the ledger parses its stored events with it, and the
accountant service's request schema is these very classes (service/schemas.py), so a range
changed here changes all three. Every field is range-checked when an event is built, so that
pricing an event (computing its curve) always succeeds in bounded time and memory: the
accountant service prices whatever a client sends. The ranges, and why nothing outside them is
meaningful:

* ``sigma`` in [1e-10, 1e10]: below, one step's RDP exceeds 10^19 at every order (nothing
  left to protect) and sigma^2 heads for float64 underflow; above, one step costs under 10^-17;
* ``q`` in (0, 1]; ``steps`` and ``count`` in [1, 10^7];
* RQM: ``m`` <= 64 levels and ``delta / c`` in [1e-6, 1e6] (privacy/rqm_accounting.py),
  ``dims`` <= 10^10;
* the distributed discrete Gaussian: ``clip`` and ``gamma`` in the range of ``sigma``, ``beta``
  in [0, 1), ``devices`` <= 10^6 (its tau term is a sum over them: 55 ms at 10^6),
  ``dim`` <= 10^10;
* ``rdp_curve``: at most 1,024 orders > 1, at least one of them an accountant order, and finite
  values >= 0 (an accountant order the curve leaves out counts as infinite: no bound there).

Nothing here imports torch or Opacus (the formulas are in privacy/rdp.py and
privacy/rqm_accounting.py), so the accountant service starts in about a second.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Annotated, Any, ClassVar, Literal, get_args

import numpy as np
from pydantic import ConfigDict, Field, TypeAdapter
from pydantic.dataclasses import dataclass

from privfed.privacy.ddg_accounting import ddg_rdp
from privfed.privacy.rdp import gaussian_rdp, sampled_gaussian_rdp
from privfed.privacy.rqm_accounting import (
    MAX_ACCOUNTED_LEVELS,
    check_accountable,
    rdp_per_coordinate,
)

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
MAX_SURVIVORS = 10**6

# The field types, with their ranges: validation and the service's JSON schema both read them.
Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Sigma = Annotated[float, Field(ge=SIGMA_RANGE[0], le=SIGMA_RANGE[1], allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]

# strict: a number is a number (not "0.5", not true), an integer an integer (not 1e3, not 2.0);
# extra: forbid. Each class is also frozen (its decorator): an event is a value, hashable, and
# the ledger counts identical events once.
_EVENT = ConfigDict(strict=True, extra="forbid")


class PrivacyEvent:
    """Base class: an immutable, serialisable privacy event with an RDP curve.

    A new kind of event is one subclass here, decorated like the others: its fields and their
    ranges (the library's checks, the ledger's parser and the accountant service's request
    schema all read them), its ``kind``, its RDP curve, where computing that curve runs
    (``curve_cost``), and, if it is a composition of Gaussian mechanisms, :meth:`gaussian`
    (which gives it a PLD too). Add it to :data:`AnyEvent`.
    """

    kind: str  # a field of each event class: the tag its JSON carries
    # How long the RDP curve takes, for the accountant service's pricing (service/pricing.py):
    # "closed_form" (microseconds), "series" (up to ~50 ms), "numeric" (up to seconds).
    curve_cost: ClassVar[Literal["closed_form", "series", "numeric"]] = "numeric"

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        raise NotImplementedError

    def gaussian(self) -> tuple[float, float, int] | None:
        """``(q, sigma, n)`` when this event is ``n`` compositions of the Poisson-subsampled
        Gaussian mechanism with sampling rate ``q`` (1: no sampling) and noise multiplier
        ``sigma``; else None. What a privacy loss distribution needs (privacy/pld.py)."""
        return None

    def to_json(self) -> str:
        # Kept on the (immutable) event: a service report asks for it at every step (its curve,
        # its compositions, its pending entry, the commit). Not a field: eq and hash ignore it.
        text = self.__dict__.get("_json")
        if text is None:
            # fields() rather than asdict(): no deep copy of the (flat) values, 5x faster
            values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
            text = self.__dict__["_json"] = json.dumps(values, sort_keys=True)
        return text


@dataclass(frozen=True, config=_EVENT)
class SampledGaussianEvent(PrivacyEvent):
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism (DP-SGD).

    Each example is included in a step's batch independently with probability ``q``; the sum of
    clipped per-example gradients (L2 bound C) gets N(0, (sigma C)^2) noise.
    """

    q: Probability
    sigma: Sigma
    steps: Count
    kind: Literal["sampled_gaussian"] = "sampled_gaussian"
    curve_cost: ClassVar = "series"

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        return self.steps * sampled_gaussian_rdp(float(self.q), float(self.sigma), orders)

    def gaussian(self) -> tuple[float, float, int]:
        return self.q, self.sigma, self.steps


@dataclass(frozen=True, config=_EVENT)
class GaussianEvent(PrivacyEvent):
    """``count`` compositions of the Gaussian mechanism with noise multiplier ``sigma``
    (noise std / L2 sensitivity), without sampling: RDP(alpha) = alpha / (2 sigma^2)."""

    sigma: Sigma
    count: Count = 1
    kind: Literal["gaussian"] = "gaussian"
    curve_cost: ClassVar = "closed_form"

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        return self.count * gaussian_rdp(float(self.sigma), orders)

    def gaussian(self) -> tuple[float, float, int]:
        return 1.0, self.sigma, self.count


@dataclass(frozen=True, config=_EVENT)
class RdpCurveEvent(PrivacyEvent):
    """A generic event given by its RDP curve over the accountant's orders."""

    orders: Annotated[
        tuple[Annotated[float, Field(gt=1, allow_inf_nan=False)], ...],
        Field(max_length=MAX_CURVE_ORDERS),
    ]
    values: Annotated[
        tuple[Annotated[float, Field(ge=0, allow_inf_nan=False)], ...],
        Field(max_length=MAX_CURVE_ORDERS),
    ]
    kind: Literal["rdp_curve"] = "rdp_curve"
    curve_cost: ClassVar = "closed_form"

    def __post_init__(self) -> None:
        if len(self.orders) != len(self.values):
            raise ValueError("rdp_curve: orders and values differ in length")
        if not set(ORDERS) & set(self.orders):
            raise ValueError(
                "rdp_curve: orders must include at least one accountant order (privacy/events.py "
                f"ORDERS: {ORDERS[0]:g} ... {ORDERS[-1]:g})"
            )

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        # An order the curve does not give has no bound: infinite, so that order is never used.
        lookup = dict(zip(self.orders, self.values, strict=True))
        return np.asarray([lookup.get(a, math.inf) for a in orders], dtype=np.float64)


@dataclass(frozen=True, config=_EVENT)
class RQMEvent(PrivacyEvent):
    """``count`` releases of RQM (privacy/rqm.py) on ``dims`` coordinates, each in
    ``[-c, c]`` and changed by at most ``sensitivity`` by one record (an L-infinity bound, so one
    record can change all of them: the per-coordinate curve times ``dims``)."""

    c: Positive
    delta: Positive
    m: Annotated[int, Field(ge=2, le=MAX_ACCOUNTED_LEVELS)]
    q: Probability
    sensitivity: Positive
    dims: Annotated[int, Field(ge=1, le=MAX_DIMS)]
    count: Count = 1
    kind: Literal["rqm"] = "rqm"
    curve_cost: ClassVar = "numeric"

    def __post_init__(self) -> None:
        check_accountable(self.c, self.delta, self.m, self.q, self.sensitivity)  # delta / c

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


@dataclass(frozen=True, config=_EVENT)
class DistributedDiscreteGaussianEvent(PrivacyEvent):
    """``count`` rounds of the distributed discrete Gaussian under secure aggregation
    (privacy/distributed_dg.py; user level, add/remove one device): devices sampled at rate
    ``q`` clip their update to ``clip``, round it onto the lattice of spacing ``gamma``
    (conditional rounding with ``beta``) and each add N_Z(0, (sigma / gamma)^2) in ``dim``
    coordinates; ``devices``: how many are guaranteed to survive the round (the protocol's
    threshold), the only noise a device counts on."""

    q: Probability
    clip: Sigma
    gamma: Sigma
    sigma: Sigma
    devices: Annotated[int, Field(ge=1, le=MAX_SURVIVORS)]
    dim: Annotated[int, Field(ge=1, le=MAX_DIMS)]
    beta: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
    count: Count = 1
    kind: Literal["distributed_discrete_gaussian"] = "distributed_discrete_gaussian"
    curve_cost: ClassVar = "series"

    def rdp(self, orders: tuple[float, ...] = ORDERS) -> np.ndarray:
        one = ddg_rdp(
            float(self.q),
            float(self.clip),
            float(self.gamma),
            float(self.sigma),
            self.devices,
            self.dim,
            float(self.beta),
            orders,
        )
        return self.count * one


# Any event, told apart by its "kind": what the ledger stores and the service's bodies carry.
# The one list of event kinds: a new class goes here.
AnyEvent = Annotated[
    SampledGaussianEvent
    | GaussianEvent
    | RdpCurveEvent
    | RQMEvent
    | DistributedDiscreteGaussianEvent,
    Field(discriminator="kind"),
]
EVENT_TYPES: dict[str, type[PrivacyEvent]] = {
    cls.kind: cls for cls in get_args(get_args(AnyEvent)[0])
}
_ANY_EVENT: TypeAdapter[Any] = TypeAdapter(AnyEvent)


def event_from_json(text: str | bytes) -> PrivacyEvent:
    """Rebuild an event from :meth:`PrivacyEvent.to_json` output (validates its fields; a
    ``pydantic.ValidationError``, a ValueError, says which and why)."""
    return _ANY_EVENT.validate_json(text)
