"""From privacy events to (epsilon, delta): accountants, registered by name.

An accountant composes a client's events and bounds its epsilon; which one a budget uses is its
``method`` (``privacy.accountant.method``, the ledger's ``budgets.method``, the service's
``BudgetIn.method``), a name in :data:`ACCOUNTANTS`, never a fixed list. Each accountant says
which events it can account (:meth:`Accountant.supports`, as dp-accounting's
``PrivacyAccountant.supports``); the ledger refuses an event its client's accountant cannot
account. The two registered here:

* ``rdp``: compose by summing RDP curves over :data:`~privfed.privacy.events.ORDERS`, convert;
  supports every event with an RDP curve;
* ``pld`` (the default): the same RDP figure, and beside it the privacy loss distribution's
  (privacy/pld.py) wherever every event has one; the smaller of the two is the answer (both are
  valid upper bounds), and :class:`Spent` says which one decided. It supports what RDP
  supports (RDP is its fallback), and tightens what :func:`~privfed.privacy.pld.supports`.

The conversion is the improved bound of Balle et al. 2020 ("Hypothesis testing interpretations
and Renyi differential privacy"), as implemented by Opacus and dp-accounting; the tests check
our figures against Google's ``dp-accounting`` RDP accountant to 1e-6 relative.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, ClassVar

import numpy as np
from pydantic import AfterValidator

from privfed.config import ConfigError, RunConfig
from privfed.privacy import pld
from privfed.privacy.events import ORDERS, PrivacyEvent

Method = str  # a name in ACCOUNTANTS
DEFAULT_METHOD: Method = "pld"


@dataclass(frozen=True)
class Spent:
    """An epsilon and the bound that gave it ("pld" or "rdp")."""

    epsilon: float
    method: str


def compose_rdp(events: Iterable[PrivacyEvent], orders: tuple[float, ...] = ORDERS) -> np.ndarray:
    """The RDP curve of the sequential composition of ``events`` (a sum over events)."""
    return _compose_counted(Counter(events), orders)


def _compose_counted(
    counted: Counter[PrivacyEvent], orders: tuple[float, ...] = ORDERS
) -> np.ndarray:
    """Identical events' curves computed once and multiplied (as the ledger does)."""
    total = np.zeros(len(orders), dtype=np.float64)
    for event, count in counted.items():
        total += count * event.rdp(orders)
    return total


@lru_cache(maxsize=16)
def _conversion_terms(orders: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(orders, dtype=np.float64)
    # The bound is numerically unstable as alpha -> 1 and useless there: no order <= 1.01 is used.
    usable = np.where(a > 1.01, 0.0, np.inf)
    return np.log((a - 1) / a) - np.log(a) / (a - 1) + usable, 1.0 / (a - 1)


def epsilon_from_rdp(
    rdp: np.ndarray, delta: float, orders: tuple[float, ...] = ORDERS
) -> tuple[float, float]:
    """(epsilon, best order) for a composed RDP curve at ``delta``.

    Opacus' ``get_privacy_spent`` formula (Balle et al. 2020, Thm. 21) with its order-only terms
    precomputed: the accountant service converts twice per report, and Opacus' general version
    (argument checks, warnings) cost more than the rest of a report. A test checks the two agree.
    """
    rdp = np.asarray(rdp, dtype=np.float64)
    if not rdp.any():
        return 0.0, float(orders[0])
    if rdp.shape != (len(orders),):
        raise ValueError(f"an RDP curve over {len(orders)} orders expected, got {rdp.shape}")
    order_terms, inverse = _conversion_terms(tuple(orders))
    eps = rdp + order_terms - math.log(delta) * inverse
    # Where delta^2 > 1 - exp(-RDP), (0, delta)-DP holds already: delta <= sqrt(1 - exp(-KL)) and
    # KL <= RDP(alpha) for every alpha > 1 (dp-accounting's compute_epsilon does the same).
    eps = np.where(delta * delta + np.expm1(-rdp) > 0, 0.0, eps)
    best = int(eps.argmin())
    if math.isnan(eps[best]):  # argmin stops at a NaN; Opacus ignores NaN orders
        eps = np.where(np.isnan(eps), np.inf, eps)
        best = int(eps.argmin())
    # Never below 0 (as dp-accounting): with a large delta the bound itself can dip under it.
    return max(0.0, float(eps[best])), float(orders[best])


class Accountant:
    """Bounds epsilon for a composition known by its RDP curve and, where every event has a
    PLD, its canonical :class:`~privfed.privacy.pld.Composition` (the ledger keeps both per
    client, so a new accountant reads what is stored rather than another copy of the events).
    A new one is a subclass and :func:`register_accountant`."""

    name: ClassVar[str]
    uses_pld: ClassVar[bool] = False  # whether bound() reads the PLD composition

    def supports(self, event: PrivacyEvent) -> bool:
        """Every event with an RDP curve: the ledger composes one for every client, so no
        accountant can take an event without it (a subclass may take fewer)."""
        return type(event).rdp is not PrivacyEvent.rdp

    def bound(
        self,
        rdp: np.ndarray,
        composition: pld.Composition | None,
        delta: float,
        compute: bool = True,
    ) -> Spent:
        raise NotImplementedError


class RdpAccountant(Accountant):
    """Sums RDP curves and converts (Balle et al. 2020)."""

    name = "rdp"

    def bound(
        self,
        rdp: np.ndarray,
        composition: pld.Composition | None,
        delta: float,
        compute: bool = True,
    ) -> Spent:
        return Spent(epsilon_from_rdp(rdp, delta)[0], "rdp")


class PldAccountant(RdpAccountant):
    """The tighter of the PLD (where every event has one) and RDP, its fallback. With
    ``compute=False`` a PLD not in the cache is not computed: RDP's figure stands (still a valid
    bound; the accountant service's commit never waits for a PLD)."""

    name = "pld"
    uses_pld = True

    def bound(
        self,
        rdp: np.ndarray,
        composition: pld.Composition | None,
        delta: float,
        compute: bool = True,
    ) -> Spent:
        by_rdp = super().bound(rdp, composition, delta)
        if composition is None or not by_rdp.epsilon <= pld.MAX_EPSILON:
            return by_rdp
        cached = 0.0 if composition.is_empty() else pld.EPSILONS.get(composition, delta)
        if cached is None and not compute:
            return by_rdp
        by_pld = cached if cached is not None else pld.EPSILONS.epsilon(composition, delta)
        return Spent(by_pld, "pld") if by_pld <= by_rdp.epsilon else by_rdp


ACCOUNTANTS: dict[str, Accountant] = {}


def register_accountant(accountant: Accountant) -> Accountant:
    ACCOUNTANTS[accountant.name] = accountant
    return accountant


register_accountant(PldAccountant())
register_accountant(RdpAccountant())


def check_method(method: str) -> Method:
    if method not in ACCOUNTANTS:
        raise ValueError(
            f"must be a registered accountant ({', '.join(ACCOUNTANTS)}), got {method!r}"
        )
    return method


def check_configured(cfg: RunConfig) -> None:
    """ConfigError (one line, the key) unless the run's accountant is registered."""
    try:
        check_method(cfg.privacy.accountant.method)
    except ValueError as err:
        raise ConfigError(f"privacy.accountant.method: {err}") from None


# A method in a validated body or config: a registered accountant's name.
MethodName = Annotated[str, AfterValidator(check_method)]


def accountant(method: str) -> Accountant:
    return ACCOUNTANTS[check_method(method)]


def check_supported(event: PrivacyEvent, method: str) -> None:
    """ValueError unless ``method``'s accountant can account ``event``."""
    if not accountant(method).supports(event):
        raise ValueError(f"the {method} accountant cannot account {event.kind!r} events")


def bound(
    rdp: np.ndarray,
    composition: pld.Composition | None,
    delta: float,
    method: Method,
    compute: bool = True,
) -> Spent:
    """The tightest epsilon ``method``'s accountant allows (see :class:`Accountant`)."""
    return accountant(method).bound(rdp, composition, delta, compute)


def spent(events: Iterable[PrivacyEvent], delta: float, method: Method = DEFAULT_METHOD) -> Spent:
    """Epsilon spent by the composition of ``events`` at ``delta``, and which bound gave it."""
    counted = Counter(events)
    for event in counted:
        check_supported(event, method)
    curve = _compose_counted(counted)
    return bound(curve, pld.composition_of(counted.items()), delta, method)


def epsilon(events: Iterable[PrivacyEvent], delta: float, method: Method = DEFAULT_METHOD) -> float:
    """Epsilon spent by the composition of ``events`` at ``delta``."""
    return spent(events, delta, method).epsilon
