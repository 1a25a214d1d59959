"""Privacy loss distributions: the tight accountant for compositions of Gaussian mechanisms.

RDP converts to (epsilon, delta) through an inequality that is loose by 5-20% where DP-SGD is
run; a privacy loss distribution (PLD; Koskela et al. 2020, Doroshenko et al. 2022) composes the
mechanisms' loss distributions themselves, so the same budget buys less noise. The PLDs here are
Google's ``dp-accounting`` (``pld.privacy_loss_distribution``), with pessimistic discretisation
(connect-the-dots): every epsilon is an upper bound, never an estimate.

Which events have a PLD: the Poisson-subsampled Gaussian (DP-SGD) and the Gaussian (Fed-SB's
initialisation). RQM and client-given RDP curves have none; a composition with one of them is
accounted by RDP alone (:func:`composition_of` returns None).

A client's events are reduced to a canonical :class:`Composition` before anything is computed:
steps of the same sampled Gaussian (q, sigma) are added up and composed by self-composition,
and all Gaussian events merge into one Gaussian (exact: a composition of Gaussian mechanisms is
the Gaussian mechanism with 1/sigma^2 = sum count_i / sigma_i^2). So ten reports of one step and
one plan of ten steps are the same computation and give the same float, and the calibration
(which plans) and the ledger (which enforces) cannot disagree about the last round.

What one epsilon costs is bounded, because the accountant service prices whatever a client sends:

* at most :data:`MAX_MECHANISMS` distinct sampled Gaussians in one composition;
* every sigma >= :data:`MIN_SIGMA` (a smaller one gives a loss distribution millions of grid
  points wide, for an epsilon in the hundreds that RDP states just as well);
* only where RDP says epsilon <= :data:`MAX_EPSILON` (the grid grows with epsilon; past it the
  budget is long spent, and tightness buys nothing).

Outside these bounds the composition is accounted by RDP, which is always computed beside it.

The service computes one composition per client round, so its cost is the service's throughput.
A sampled Gaussian's self-composition is dp-accounting's algorithm (Chernoff tail bounds, one FFT
power, the truncated mass counted as infinite loss) with what does not depend on the number of
steps cached per (q, sigma): the bounds' moment generating function and the base's spectrum, of
which only the frequencies that do not underflow are raised to the power. epsilon is
dp-accounting's walk down the losses, vectorised. Together 7-17x faster than dp-accounting's
own calls on the compositions the runs make (``python bench/accountant.py --only
composition``), equal to them to float noise (tests/unit/test_pld.py).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from privfed.privacy.events import PrivacyEvent

# Grid step of the privacy loss values. dp-accounting's PLDAccountant uses 1e-4; 1e-3 is 10x
# faster and, on the runs this project makes, within 0.06% of it (tests/unit/test_pld.py; the
# pessimistic rounding adds at most one step per composed mechanism, never subtracts).
GRID = 1e-3
TAIL_MASS = 1e-15  # dp-accounting's default tail truncation for compositions
MAX_MECHANISMS = 8
MIN_SIGMA = 0.1
MAX_EPSILON = 100.0
_LOG_UNDERFLOW = -760.0  # exp() of less is 0.0 in float64 (the smallest subnormal is e^-744.4)


@dataclass(frozen=True, order=True)
class Composition:
    """A canonical description of a composition of Gaussian mechanisms: ``sampled`` is
    ((q, sigma, total steps), ...) sorted, one entry per distinct (q, sigma); ``gaussian_mu2`` is
    sum count / sigma^2 over the Gaussian events (0.0 when there are none)."""

    sampled: tuple[tuple[float, float, int], ...]
    gaussian_mu2: float = 0.0

    def is_empty(self) -> bool:
        return not self.sampled and self.gaussian_mu2 == 0.0

    def plus(self, other: Composition) -> Composition | None:
        """Both compositions in one, or None past :data:`MAX_MECHANISMS` (RDP accounts it)."""
        steps: dict[tuple[float, float], int] = {}
        for q, sigma, n in (*self.sampled, *other.sampled):
            steps[(q, sigma)] = steps.get((q, sigma), 0) + n
        if len(steps) > MAX_MECHANISMS:
            return None
        return Composition(
            tuple(sorted((q, s, n) for (q, s), n in steps.items())),
            _sum_sorted([self.gaussian_mu2, other.gaussian_mu2]),
        )


def _sum_sorted(values: Iterable[float]) -> float:
    return math.fsum(sorted(values))  # exact and order-free: the same events give the same float


def supports(event: PrivacyEvent) -> bool:
    """Whether ``event`` has a PLD here: a composition of (subsampled) Gaussian mechanisms
    (:meth:`~privfed.privacy.events.PrivacyEvent.gaussian`) with sigma >= :data:`MIN_SIGMA`."""
    parts = event.gaussian()
    return parts is not None and parts[1] >= MIN_SIGMA


def composition_of(counted: Iterable[tuple[PrivacyEvent, int]]) -> Composition | None:
    """The canonical composition of (event, how many times) pairs, or None when one of the events
    has no PLD here (RQM, a given RDP curve) or a sigma is below :data:`MIN_SIGMA`."""
    steps: dict[tuple[float, float], int] = {}
    mu2: list[float] = []
    for event, count in counted:
        parts = event.gaussian()
        if parts is None or parts[1] < MIN_SIGMA:
            return None
        q, sigma, n = parts
        if q < 1.0:  # Poisson-subsampled: composed as a PLD
            key = (float(q), float(sigma))
            steps[key] = steps.get(key, 0) + n * count
            if len(steps) > MAX_MECHANISMS:
                return None
        else:  # the plain Gaussian: composes exactly, as mu^2 = sum n / sigma^2
            mu2.append(n * count / (float(sigma) ** 2))
    return Composition(tuple(sorted((q, s, n) for (q, s), n in steps.items())), _sum_sorted(mu2))


@lru_cache(maxsize=32)
def _sampled_gaussian(q: float, sigma: float) -> Any:
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=GRID, pessimistic_estimate=True
    )


class _Pmf:
    """One direction (remove or add) of a mechanism's dense PLD, with what every self-composition
    of it reuses: the Chernoff tail bounds' log moment generating function (dp-accounting
    recomputes it, 40 log-sum-exps over the whole grid, on every composition) and the base's FFT
    per transform length. This is dp-accounting's ``DensePLDPmf.self_compose`` and
    ``common.self_convolve``, step for step, with those two cached."""

    def __init__(self, dense: Any) -> None:
        from scipy import special

        # dp-accounting builds a SparsePLDPmf where few losses carry mass (a large sigma: the
        # epsilon = 1 runs); its own self_compose makes it dense before any long composition.
        dense = dense.to_dense_pmf()
        # dp-accounting's DensePLDPmf keeps these private; tests/unit/test_pld.py pins the
        # result to dp-accounting's own self_compose, so a change there fails a test, not a bound.
        self.discretization = float(dense._discretization)
        self.lower_loss = int(dense._lower_loss)
        self.probs = np.asarray(dense._probs, dtype=np.float64)
        self.infinity_mass = float(dense._infinity_mass)
        self.pessimistic = bool(dense._pessimistic_estimate)
        size = len(self.probs)
        self.orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / size
        grid = np.arange(size)
        self.log_mgfs = [float(special.logsumexp(grid * o, b=self.probs)) for o in self.orders]
        self._ffts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def _bounds(self, num_times: int) -> tuple[int, int]:
        """``common.compute_self_convolve_bounds`` from the cached log-MGFs."""
        upper, lower = (len(self.probs) - 1) * num_times, 0
        for order, log_mgf in zip(self.orders, self.log_mgfs, strict=True):
            bound = (num_times * log_mgf + math.log(2 / TAIL_MASS)) / order
            if not math.isfinite(bound):
                continue
            if order > 0:
                upper = min(upper, math.ceil(bound))
            else:
                lower = max(lower, math.floor(bound))
        return lower, upper

    def _fft(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The base's FFT at ``length``, in polar form: (log |F|, arg F)."""
        with self._lock:
            cached = self._ffts.get(length)
            if cached is None:
                transform = np.fft.rfft(self.probs, length)
                with np.errstate(divide="ignore"):
                    cached = (np.log(np.abs(transform)), np.angle(transform))
                self._ffts[length] = cached
                while len(self._ffts) > 2:  # consecutive rounds mostly share a length
                    self._ffts.popitem(last=False)
            return cached

    def _power(self, length: int, num_times: int) -> np.ndarray:
        """F ** num_times, computed only where it does not underflow: |F| < 1 away from the
        lowest frequencies, so after many compositions most of the spectrum is exactly 0.0."""
        log_abs, angle = self._fft(length)
        log_abs_n = num_times * log_abs
        alive = log_abs_n > _LOG_UNDERFLOW
        power = np.zeros(len(log_abs), dtype=np.complex128)
        power[alive] = np.exp(log_abs_n[alive] + 1j * (num_times * angle[alive]))
        return power

    def self_compose(self, num_times: int) -> Any:
        """The ``num_times``-fold composition, as a dp-accounting ``DensePLDPmf``: the mass
        outside the Chernoff bounds (at most TAIL_MASS) counts as infinite loss, so it stays
        pessimistic."""
        from dp_accounting.pld.pld_pmf import DensePLDPmf
        from scipy import fft

        if num_times == 1:  # dp-accounting returns the base itself, untruncated
            return DensePLDPmf(
                self.discretization,
                self.lower_loss,
                self.probs,
                self.infinity_mass,
                self.pessimistic,
            )
        lower, upper = self._bounds(num_times)
        out_len = upper - lower + 1
        fast_len = fft.next_fast_len(max(out_len, len(self.probs)), real=True)
        cyclic = np.fft.irfft(self._power(fast_len, num_times), fast_len)
        probs = np.roll(cyclic, -lower)[:out_len]  # the FFT wraps modulo fast_len
        infinity = TAIL_MASS - math.expm1(num_times * math.log1p(-self.infinity_mass))
        return DensePLDPmf(
            self.discretization,
            self.lower_loss * num_times + lower,
            probs,
            infinity,
            self.pessimistic,
        )


@lru_cache(maxsize=8)  # each: up to 2 spectra a direction, ≤ 2.4 MB each under the limits
def _sampled_gaussian_pmfs(q: float, sigma: float) -> tuple[_Pmf, _Pmf | None]:
    base = _sampled_gaussian(q, sigma)
    remove = _Pmf(base._pmf_remove)
    return remove, None if base._symmetric else _Pmf(base._pmf_add)


def _self_composed(q: float, sigma: float, steps: int) -> Any:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

    remove, add = _sampled_gaussian_pmfs(q, sigma)
    return PrivacyLossDistribution(
        remove.self_compose(steps), None if add is None else add.self_compose(steps)
    )


def _distribution(composition: Composition) -> Any:
    """The composed PLD (dp-accounting object)."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    parts = [_self_composed(q, s, n) for q, s, n in composition.sampled]
    if composition.gaussian_mu2 > 0:
        parts.append(
            pld.from_gaussian_mechanism(
                1.0 / math.sqrt(composition.gaussian_mu2),
                value_discretization_interval=GRID,
                pessimistic_estimate=True,
            )
        )
    total = parts[0]
    for part in parts[1:]:
        total = total.compose(part, TAIL_MASS)
    return total


def _epsilon_of_pmf(pmf: Any, delta: float) -> float:
    """dp-accounting's ``_get_epsilon_for_delta`` (the smallest epsilon whose hockey-stick
    divergence is at most delta), vectorised: the same walk down the losses from the top, with
    its running masses as cumulative sums over blocks (doubling in size), so it costs numpy
    operations over the part of the grid the walk reaches instead of a Python loop."""
    dense = pmf.to_dense_pmf()
    infinity = float(dense._infinity_mass)
    if infinity > delta:
        return math.inf
    probs = np.asarray(dense._probs, dtype=np.float64)[::-1]
    top = dense._lower_loss + len(probs) - 1
    step = float(dense._discretization)
    upper, lower = infinity, 0.0  # the walk's masses so far: P[loss above] and E[e^-loss; above]
    start, size = 0, 1024
    while start < len(probs):
        block = probs[start : start + size]
        losses = (top - np.arange(start, start + len(block))) * step
        uppers = np.cumsum(np.concatenate(([upper], block)))  # [k]: before entry k, [k+1]: after
        lowers = np.cumsum(np.concatenate(([lower], np.exp(-losses) * block)))
        with np.errstate(divide="ignore", invalid="ignore"):
            stops = (
                (uppers[:-1] > delta)
                & (lowers[:-1] > 0)
                & (np.log((uppers[:-1] - delta) / lowers[:-1]) >= losses)
            )
        underflows = (uppers[1:] >= delta) & (lowers[1:] == 0)  # exp(-loss) is 0 up there
        first_stop = int(np.argmax(stops)) if stops.any() else len(block)
        first_underflow = int(np.argmax(underflows)) if underflows.any() else len(block)
        if first_underflow < first_stop:
            return max(0.0, float(losses[first_underflow]))
        if first_stop < len(block):
            upper, lower = float(uppers[first_stop]), float(lowers[first_stop])
            break
        upper, lower = float(uppers[-1]), float(lowers[-1])
        start, size = start + len(block), size * 2
    if upper <= lower + delta:
        return 0.0
    return math.log((upper - delta) / lower)


class EpsilonCache:
    """epsilon by (composition, delta), shared by every ledger in the process (an LRU). A
    computation in progress is not repeated: a second caller for the same key waits for it."""

    def __init__(self, size: int = 65536) -> None:
        self.size = size
        self._values: OrderedDict[tuple[Composition, float], float] = OrderedDict()
        self._lock = threading.Lock()
        self._busy: dict[tuple[Composition, float], threading.Lock] = {}

    def get(self, composition: Composition, delta: float) -> float | None:
        key = (composition, float(delta))
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, composition: Composition, delta: float, value: float) -> None:
        key = (composition, float(delta))
        with self._lock:
            self._values[key] = float(value)
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)

    def epsilon(self, composition: Composition, delta: float) -> float:
        """The cached epsilon, else computed here (and cached)."""
        cached = self.get(composition, delta)
        if cached is not None:
            return cached
        key = (composition, float(delta))
        with self._lock:
            busy = self._busy.setdefault(key, threading.Lock())
        with busy:
            cached = self.get(composition, delta)
            if cached is None:
                cached = compute_epsilon(composition, delta)
                self.put(composition, delta, cached)
        with self._lock:
            self._busy.pop(key, None)
        return cached


def compute_epsilon(composition: Composition, delta: float) -> float:
    """epsilon of ``composition`` at ``delta`` by its PLD (uncached; see :data:`EPSILONS`), or
    inf where dp-accounting cannot build the distribution (it raises on extreme parameters, e.g.
    a subnormal q): no PLD bound there, so RDP decides."""
    if composition.is_empty():
        return 0.0
    try:
        distribution = _distribution(composition)
        pmfs = [distribution._pmf_remove]
        if not distribution._symmetric:
            pmfs.append(distribution._pmf_add)
        return max(0.0, *(_epsilon_of_pmf(pmf, delta) for pmf in pmfs))
    except (ValueError, ArithmeticError):
        return math.inf


EPSILONS = EpsilonCache()
