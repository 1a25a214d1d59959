"""The torch-free RDP formulas the accountant prices events with (privacy/rdp.py), against Opacus,
Google's dp-accounting and a 60-digit mpmath evaluation; and the range limits that keep every
in-range event's pricing finite, non-negative and free of exceptions."""

from __future__ import annotations

import subprocess
import sys

import mpmath
import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as dpa
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis import rdp as opacus_rdp

from privfed.privacy.accountant import epsilon
from privfed.privacy.events import (
    ORDERS,
    SIGMA_RANGE,
    GaussianEvent,
    RdpCurveEvent,
    RQMEvent,
    SampledGaussianEvent,
)
from privfed.privacy.rdp import sampled_gaussian_rdp
from privfed.privacy.rqm_accounting import MAX_ACCOUNTED_LEVELS, rdp_per_coordinate

GRID = [(q, s) for q in (1e-6, 1e-3, 0.01, 0.3, 0.7191, 0.99) for s in (0.4, 0.8, 1.0, 1.62, 4.0)]


@pytest.mark.parametrize("q,sigma", GRID)
def test_sampled_gaussian_equals_opacus_where_opacus_is_exact(q, sigma):
    # Integer orders: Opacus stops the fractional-order series on an absolute e^-30 (see below).
    integer = tuple(a for a in ORDERS if a == int(a))
    ours = sampled_gaussian_rdp(q, sigma, integer)
    theirs = np.asarray(
        opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(integer))
    )
    # Opacus sums A_alpha ~ 1 + tiny and loses the tiny part below ~1e-16 to cancellation: on
    # small values it is off by that much in absolute terms (ours: see the mpmath test).
    big = theirs > 1e-6
    np.testing.assert_allclose(ours[big], theirs[big], rtol=1e-9)
    np.testing.assert_allclose(ours[~big], theirs[~big], atol=1e-14)


@pytest.mark.parametrize("q,sigma", GRID[::3])
def test_sampled_gaussian_equals_dp_accounting(q, sigma):
    """Every order, fractional ones included (dp-accounting's series and stopping rule)."""
    accountant = dpa.RdpAccountant(list(ORDERS))
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), 1)
    theirs = np.asarray(accountant._rdp)  # noqa: SLF001 (its composed curve, by order)
    big = theirs > 1e-6
    ours = sampled_gaussian_rdp(q, sigma, ORDERS)
    # Where dp-accounting's series does not converge (large q), the order is excluded: inf.
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    # Where its fractional value exceeds the exact integer order above it (RDP is non-decreasing
    # in alpha), ours is that integer order's value: a tighter valid bound, never a looser one.
    a = np.asarray(ORDERS)
    cap = np.asarray([ours[ORDERS.index(max(2.0, float(np.ceil(x))))] for x in a])
    capped = (a != np.floor(a)) & np.isfinite(theirs) & (theirs > cap)
    np.testing.assert_allclose(ours[capped], cap[capped], rtol=1e-12)
    np.testing.assert_allclose(ours[big & ~capped], theirs[big & ~capped], rtol=1e-9)
    finite = np.isfinite(theirs)
    assert (ours[finite] <= theirs[finite] * (1 + 1e-9) + 1e-15).all()


def test_opacus_and_dp_accounting_differ_at_fractional_orders_and_we_follow_dp_accounting():
    """The note in privacy/events.py: at alpha = 1.1, q = 0.01, sigma = 1 Opacus 1.6 is off."""
    theirs = opacus_rdp.compute_rdp(q=0.01, noise_multiplier=1.0, steps=1, orders=[1.1])[0]
    accountant = dpa.RdpAccountant([1.1])
    accountant.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.0)), 1)
    reference = accountant._rdp[0]  # noqa: SLF001
    ours = sampled_gaussian_rdp(0.01, 1.0, (1.1,))[0]
    assert ours == pytest.approx(reference, rel=1e-9)
    assert abs(theirs - reference) > 0.01 * reference


@pytest.mark.parametrize(
    "q,sigma,alpha", [(1e-9, 1.0, 2), (1e-4, 100.0, 2), (0.01, 0.5, 63), (0.5, 3.0, 512)]
)
def test_sampled_gaussian_is_exact_where_cancellation_defeats_the_libraries(q, sigma, alpha):
    mpmath.mp.dps = 60
    qm, sm = mpmath.mpf(q), mpmath.mpf(sigma)
    a_alpha = mpmath.fsum(
        mpmath.binomial(alpha, i)
        * (1 - qm) ** (alpha - i)
        * qm**i
        * mpmath.exp((i * i - i) / (2 * sm * sm))
        for i in range(alpha + 1)
    )
    exact = float(mpmath.log(a_alpha) / (alpha - 1))
    ours = sampled_gaussian_rdp(q, sigma, ORDERS)[ORDERS.index(float(alpha))]
    assert ours == pytest.approx(exact, rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(
    q=st.floats(min_value=5e-324, max_value=1.0, exclude_min=False),
    sigma=st.floats(min_value=SIGMA_RANGE[0], max_value=SIGMA_RANGE[1]),
    steps=st.integers(1, 10_000_000),
    delta=st.floats(min_value=1e-300, max_value=0.999),
)
def test_every_in_range_sampled_gaussian_prices_finite_and_non_negative(q, sigma, steps, delta):
    curve = SampledGaussianEvent(q, sigma, steps).rdp()
    integer = np.asarray([a == int(a) for a in ORDERS])
    # Integer orders are exact sums, always finite; a fractional order whose series does not
    # converge is inf (no bound there), as in dp-accounting.
    assert np.isfinite(curve[integer]).all() and (curve >= 0).all()
    events = [SampledGaussianEvent(q, sigma, steps), GaussianEvent(sigma, steps)]
    assert epsilon(events, delta, "rdp") >= 0


@pytest.mark.parametrize(
    "sigma", [0.0, 1e-300, SIGMA_RANGE[0] / 2, SIGMA_RANGE[1] * 2, 1e300, float("inf")]
)
def test_sigma_outside_its_range_is_refused_with_the_range(sigma):
    """The message names the field and the bound it breaks (pydantic's, from events.py)."""
    bound = r"(greater than or equal to 0\.0000000001|less than or equal to 10000000000|finite)"
    for make in (
        lambda: GaussianEvent(sigma=sigma),
        lambda: SampledGaussianEvent(q=0.1, sigma=sigma, steps=1),
    ):
        with pytest.raises(ValueError, match=r"\nsigma\n  Input should be .*" + bound):
            make()


def test_epsilon_is_never_negative():
    """With a large delta the Balle et al. bound itself goes below 0; dp-accounting clamps."""
    assert epsilon([GaussianEvent(100.0)], 0.5) == 0.0


def test_an_rdp_curve_must_give_an_accountant_order():
    with pytest.raises(ValueError, match="at least one accountant order"):
        RdpCurveEvent(orders=(1.05, 1.07), values=(0.1, 0.2))
    full = RdpCurveEvent(orders=ORDERS, values=tuple(0.01 * a for a in ORDERS))
    np.testing.assert_allclose(full.rdp(), [0.01 * a for a in ORDERS])


def test_rqm_levels_beyond_the_accounted_limit_are_refused_with_it():
    with pytest.raises(
        ValueError, match=f"\\nm\\n  Input should be less than or equal to {MAX_ACCOUNTED_LEVELS}"
    ):
        RQMEvent(c=1.0, delta=0.25, m=MAX_ACCOUNTED_LEVELS + 1, q=0.5, sensitivity=0.01, dims=10)


def test_rqm_curve_is_scale_free_so_rescaled_events_share_it():
    """c, delta and the sensitivity only matter as ratios (the cache key is c = 1)."""
    one = rdp_per_coordinate(1.0, 0.25, 8, 0.5, 0.01, ORDERS)
    scaled = rdp_per_coordinate(0.003, 0.00075, 8, 0.5, 0.00003, ORDERS)
    np.testing.assert_allclose(scaled, one, rtol=1e-9)
    # A sensitivity beyond the whole range 2c allows every pair, as 2c does.
    np.testing.assert_array_equal(
        rdp_per_coordinate(1.0, 0.25, 8, 0.5, 5.0, ORDERS),
        rdp_per_coordinate(1.0, 0.25, 8, 0.5, 2.0, ORDERS),
    )


def test_the_accountant_service_and_the_cli_start_without_torch():
    """A restarted service must answer within its clients' retry window: importing torch took
    9-33 s here. Neither the service nor the accountant CLI may import it."""
    code = (
        "import sys\n"
        "import privfed.privacy.service.app, privfed.privacy.accountant_cli\n"
        "from privfed.privacy.events import RQMEvent\n"
        "RQMEvent(c=1.0, delta=0.25, m=8, q=0.5, sensitivity=0.01, dims=3).rdp()\n"
        "heavy = ('torch', 'opacus', 'transformers', 'flwr', 'ray')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
