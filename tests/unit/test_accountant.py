"""Our RDP accountant against Google's dp-accounting (an independent implementation): with
``method="rdp"`` and dp-accounting's own default orders, the same epsilon to 1e-6 relative.
(The PLD accountant, the default, is tested in test_pld.py.)"""

from __future__ import annotations

import itertools

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as dpa_rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from privfed.privacy.accountant import Spent, compose_rdp, epsilon, epsilon_from_rdp, spent
from privfed.privacy.calibration import BudgetUnreachableError, calibrate_dp_sgd, calibrate_sigma
from privfed.privacy.events import (
    ORDERS,
    GaussianEvent,
    RdpCurveEvent,
    SampledGaussianEvent,
    event_from_json,
)


def dp_accounting_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()  # its default orders
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
    ours = epsilon([SampledGaussianEvent(q=q, sigma=sigma, steps=steps)], delta, "rdp")
    theirs = dp_accounting_epsilon(q, sigma, steps, delta)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_known_value_from_environment_notes():
    # q=0.01, sigma=1, 10,000 steps, delta=1e-5: ~6.71 (ENVIRONMENT.md, Opacus/dp-accounting)
    got = epsilon([SampledGaussianEvent(0.01, 1.0, 10_000)], 1e-5, "rdp")
    assert got == pytest.approx(6.72, abs=0.03)


def test_orders_are_dp_accounting_defaults():
    assert [float(a) for a in dpa_rdp.DEFAULT_RDP_ORDERS] == list(ORDERS)


def test_issue_figure_privfed_accountant_equals_dp_accounting_default_rdp():
    # Issue 15: with integer orders only, 2.3469 against dp-accounting's 2.3332.
    got = epsilon([SampledGaussianEvent(0.004, 0.8, 2500)], 1e-5, "rdp")
    assert got == pytest.approx(dp_accounting_epsilon(0.004, 0.8, 2500, 1e-5), rel=1e-6)
    assert got == pytest.approx(2.3332, abs=1e-4)


def test_gaussian_event_matches_dp_accounting():
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(3.0), 4)
    assert epsilon([GaussianEvent(sigma=3.0, count=4)], 1e-5, "rdp") == pytest.approx(
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
    by_rdp = epsilon([src], 1e-5, "rdp")
    assert epsilon([curve], 1e-5, "rdp") == pytest.approx(by_rdp, rel=1e-12)
    # A curve has no PLD: under the default method it is still RDP's figure, and says so.
    assert spent([curve], 1e-5) == Spent(pytest.approx(by_rdp, rel=1e-12), "rdp")
    assert spent([src], 1e-5).method == "pld" and spent([src], 1e-5).epsilon < by_rdp


def test_an_rdp_curve_missing_orders_has_no_bound_there():
    src = SampledGaussianEvent(0.05, 1.2, 100)
    integer = tuple(a for a in ORDERS if a == int(a))  # a curve from before fractional orders
    curve = RdpCurveEvent(integer, tuple(src.rdp(integer)))
    assert np.isinf(curve.rdp()[ORDERS.index(1.5)])
    full = epsilon([src], 1e-5, "rdp")
    assert full <= epsilon([curve], 1e-5, "rdp") <= full * 1.05
    with pytest.raises(ValueError, match="at least one accountant order"):
        RdpCurveEvent((1.05,), (0.1,))


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
def test_epsilon_conversion_equals_dp_accounting(curve, delta):
    """Our precomputed conversion is dp-accounting's compute_epsilon, order for order."""
    rdp = np.array(curve)
    if not rdp.any():
        return
    want, want_order = dpa_rdp.compute_epsilon(list(ORDERS), list(rdp), delta)
    got, got_order = epsilon_from_rdp(rdp, delta)
    assert got == pytest.approx(float(want), rel=1e-12, abs=1e-12)
    if want > 0:  # (at 0 several orders tie)
        assert got_order == want_order


def test_epsilon_conversion_of_an_unbounded_curve_is_infinite():
    assert epsilon_from_rdp(np.full(len(ORDERS), np.inf), 1e-5)[0] == np.inf


@pytest.mark.parametrize(
    "q,steps,target", [(0.36, 15, 8.0), (0.01, 1000, 1.0), (0.1, 50, 3.0), (1.0, 3, 8.0)]
)
def test_calibrated_sigma_meets_target_and_is_within_one_percent_of_minimal(q, steps, target):
    delta = 1e-5
    sigma = calibrate_sigma(
        lambda s: [SampledGaussianEvent(q, s, steps)], target, delta, method="rdp"
    )
    assert dp_accounting_epsilon(q, sigma, steps, delta) <= target * (1 + 1e-9)
    assert dp_accounting_epsilon(q, sigma * 0.99, steps, delta) > target


def test_one_sigma_for_all_clients_covers_the_worst():
    plans = [(0.36, 3), (0.5, 2), (0.1, 10)]
    sigma = calibrate_dp_sgd(plans, num_rounds=5, target_epsilon=3.0, delta=1e-5, method="rdp")
    worst = max(epsilon([SampledGaussianEvent(q, sigma, s * 5)], 1e-5, "rdp") for q, s in plans)
    assert worst <= 3.0 and worst > 3.0 * 0.98


def test_unreachable_budget_is_refused():
    with pytest.raises(BudgetUnreachableError, match="cannot be met"):
        calibrate_sigma(lambda s: [SampledGaussianEvent(1.0, s, 10**6)], 1e-3, 1e-10)
