"""Our RDP accountant against Google's dp-accounting (an independent implementation)."""

from __future__ import annotations

import itertools

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis import rdp as opacus_rdp

from privfed.privacy.accountant import compose_rdp, epsilon, epsilon_from_rdp
from privfed.privacy.calibration import BudgetUnreachableError, calibrate_dp_sgd, calibrate_sigma
from privfed.privacy.events import (
    ORDERS,
    GaussianEvent,
    RdpCurveEvent,
    SampledGaussianEvent,
    event_from_json,
)


def dp_accounting_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


GRID = list(
    itertools.product(
        [0.001, 0.01, 0.1, 0.36, 1.0],
        [0.5, 0.8, 1.0, 2.0, 5.0],
        [1, 15, 1000, 10_000],
        [1e-5, 1e-6],
    )
)


@pytest.mark.parametrize("q,sigma,steps,delta", GRID)
def test_sampled_gaussian_matches_dp_accounting(q, sigma, steps, delta):
    ours = epsilon([SampledGaussianEvent(q=q, sigma=sigma, steps=steps)], delta)
    theirs = dp_accounting_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_known_value_from_environment_notes():
    # q=0.01, sigma=1, 10,000 steps, delta=1e-5: ~6.71 (ENVIRONMENT.md, Opacus/dp-accounting)
    assert epsilon([SampledGaussianEvent(0.01, 1.0, 10_000)], 1e-5) == pytest.approx(6.72, abs=0.02)


def test_gaussian_event_matches_dp_accounting():
    acc = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    acc.compose(dp_accounting.GaussianDpEvent(3.0), 4)
    assert epsilon([GaussianEvent(sigma=3.0, count=4)], 1e-5) == pytest.approx(
        acc.get_epsilon(1e-5), rel=1e-6
    )


def test_composition_is_sum_of_rdp():
    a, b = SampledGaussianEvent(0.1, 1.0, 10), SampledGaussianEvent(0.2, 2.0, 5)
    np.testing.assert_allclose(compose_rdp([a, b]), a.rdp() + b.rdp())
    split = epsilon([SampledGaussianEvent(0.1, 1.0, 4), SampledGaussianEvent(0.1, 1.0, 6)], 1e-5)
    assert split == pytest.approx(epsilon([a], 1e-5), rel=1e-12)


def test_rdp_curve_event_equals_its_source():
    src = SampledGaussianEvent(0.05, 1.2, 100)
    curve = RdpCurveEvent(orders=ORDERS, values=tuple(src.rdp()))
    assert epsilon([curve], 1e-5) == pytest.approx(epsilon([src], 1e-5), rel=1e-12)


def test_events_round_trip_json():
    for ev in (
        SampledGaussianEvent(0.1, 1.0, 3),
        GaussianEvent(2.0, 2),
        RdpCurveEvent(ORDERS, tuple(float(i) for i in range(len(ORDERS)))),
    ):
        assert event_from_json(ev.to_json()) == ev


@pytest.mark.parametrize(
    "kwargs",
    [
        {"q": 0.0, "sigma": 1.0, "steps": 1},
        {"q": 1.5, "sigma": 1.0, "steps": 1},
        {"q": 0.1, "sigma": -1.0, "steps": 1},
        {"q": 0.1, "sigma": float("nan"), "steps": 1},
        {"q": 0.1, "sigma": 1.0, "steps": 0},
        {"q": 0.1, "sigma": 1.0, "steps": 10**9},
    ],
)
def test_invalid_events_are_refused(kwargs):
    with pytest.raises(ValueError):
        SampledGaussianEvent(**kwargs)


def test_empty_ledger_spends_nothing():
    assert epsilon_from_rdp(np.zeros(len(ORDERS)), 1e-5)[0] == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e4), min_size=len(ORDERS), max_size=len(ORDERS)),
    st.floats(1e-12, 0.5),
)
def test_epsilon_conversion_equals_opacus(curve, delta):
    """Our precomputed conversion is Opacus' get_privacy_spent, order for order."""
    rdp = np.array(curve)
    if not rdp.any():
        return
    want, want_order = opacus_rdp.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    got, got_order = epsilon_from_rdp(rdp, delta)
    assert got == pytest.approx(max(0.0, float(want)), rel=1e-12, abs=1e-12)  # clamped at 0
    assert got_order == want_order


def test_epsilon_conversion_of_an_unbounded_curve_is_infinite():
    assert epsilon_from_rdp(np.full(len(ORDERS), np.inf), 1e-5)[0] == np.inf


@pytest.mark.parametrize(
    "q,steps,target", [(0.36, 15, 8.0), (0.01, 1000, 1.0), (0.1, 50, 3.0), (1.0, 3, 8.0)]
)
def test_calibrated_sigma_meets_target_and_is_within_one_percent_of_minimal(q, steps, target):
    delta = 1e-5
    sigma = calibrate_sigma(lambda s: [SampledGaussianEvent(q, s, steps)], target, delta)
    assert dp_accounting_epsilon(q, sigma, steps, delta) <= target * (1 + 1e-9)
    assert dp_accounting_epsilon(q, sigma * 0.99, steps, delta) > target


def test_one_sigma_for_all_clients_covers_the_worst():
    plans = [(0.36, 3), (0.5, 2), (0.1, 10)]
    sigma = calibrate_dp_sgd(plans, num_rounds=5, target_epsilon=3.0, delta=1e-5)
    worst = max(epsilon([SampledGaussianEvent(q, sigma, s * 5)], 1e-5) for q, s in plans)
    assert worst <= 3.0 and worst > 3.0 * 0.98


def test_unreachable_budget_is_refused():
    with pytest.raises(BudgetUnreachableError, match="cannot be met"):
        calibrate_sigma(lambda s: [SampledGaussianEvent(1.0, s, 10**6)], 1e-3, 1e-10)
