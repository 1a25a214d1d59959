"""The distributed discrete Gaussian (privacy/distributed_dg.py) against independent computations:
its sampler against the exact probability mass function, its encoding against exact integer
arithmetic, its accounting against dp-accounting's Gaussian where the discrete terms vanish."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as dpa

from privfed.privacy import ddg_accounting as acc
from privfed.privacy import distributed_dg as ddg
from privfed.privacy.invariants import PrivacyInvariantError
from privfed.randomness import RandomStream


def _stream(purpose: str, *ids: int) -> RandomStream:
    # Seeded streams, in this test only, so that a failure can be reproduced; the mechanism
    # takes whichever stream it is given (secret ones in a release).
    return RandomStream.public(7, purpose, *ids)


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    """The discrete Gaussian's exact mass on ``support``, normalised over |x| <= 60 sigma."""
    wide = np.arange(-int(60 * sigma) - 60, int(60 * sigma) + 61)
    z = np.exp(-(wide.astype(np.float64) ** 2) / (2 * sigma**2)).sum()
    return np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2)) / z


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.5, 7.3])
def test_the_sampler_draws_the_discrete_gaussian(sigma):
    n = 200_000
    draws = ddg.discrete_gaussian(sigma, n, _stream("dg", int(sigma * 10))).numpy()
    assert draws.dtype == np.int64 and draws.shape == (n,)
    support = np.arange(-int(8 * sigma) - 2, int(8 * sigma) + 3)
    exact = _pmf(sigma, support)
    counts = np.array([(draws == x).sum() for x in support])
    # total variation on the support; its sampling error at n = 200,000 is about 0.003
    assert 0.5 * np.abs(counts / n - exact).sum() < 0.01
    variance = float((exact * support.astype(np.float64) ** 2).sum())
    assert abs(draws.var() - variance) < 5 * variance * math.sqrt(2 / n) + 1e-3
    # below sigma ~ 1 the discrete Gaussian's variance is visibly below sigma^2: the shape, not
    # just the scale, is the discrete one
    if sigma < 0.5:
        assert variance < 0.9 * sigma**2 and abs(draws.var() - variance) < 0.05 * sigma**2


def test_conditional_rounding_is_unbiased_and_within_its_bound():
    x = torch.tensor([0.25, -1.5, 3.9, 0.0, -0.01], dtype=torch.float64)
    bound = acc.rounded_l2_bound(float(torch.linalg.vector_norm(x)), x.numel(), beta=0.5)
    stream = _stream("round")
    rounds = torch.stack([ddg.conditional_round(x, bound, stream) for _ in range(4000)])
    assert rounds.dtype == torch.int64
    assert torch.all(torch.linalg.vector_norm(rounds.double(), dim=1) <= bound)
    assert torch.all((rounds - torch.floor(x)).abs() <= 1)  # down or up, nothing else
    # conditioning on the norm biases it slightly; far less than the lattice spacing here
    assert torch.allclose(rounds.double().mean(0), x, atol=0.05)


def test_an_unclipped_vector_is_refused_not_released():
    x = torch.full((100,), 10.0, dtype=torch.float64)
    with pytest.raises(PrivacyInvariantError, match="norm bound"):
        ddg.conditional_round(x + 0.5, bound=5.0, stream=_stream("round"))


def _shares(n: int, dim: int, bits: int, sigma: float, gamma: float = 0.01, clip: float = 1.0):
    """n devices' shares, and their exact integer sum (the same draws again, by integer
    arithmetic and without the ring)."""
    updates = [torch.randn(dim, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    shares = [
        ddg.device_share(u, clip, gamma, sigma, 0.1, bits, _stream("r", i), _stream("n", i))
        for i, u in enumerate(updates)
    ]
    exact = torch.zeros(dim, dtype=torch.int64)
    for i, u in enumerate(updates):
        x = ddg.clip_l2(u, clip) / gamma
        bound = acc.rounded_l2_bound(clip / gamma, dim, 0.1)
        rounded = ddg.conditional_round(x, bound, _stream("r", i))
        exact += rounded + ddg.discrete_gaussian(sigma / gamma, dim, _stream("n", i))
    return updates, shares, exact


def test_the_server_decodes_the_sum_of_clipped_updates_plus_the_devices_noise():
    n, dim, bits, gamma, sigma, clip = 20, 300, 20, 0.01, 0.05, 1.0
    updates, shares, exact = _shares(n, dim, bits, sigma, gamma, clip)
    assert all(s.min() >= 0 and s.max() < 2**bits for s in shares)
    assert ddg.wraps(exact, bits) == 0
    decoded = ddg.decode(ddg.ring_sum(shares, bits), gamma, bits)
    torch.testing.assert_close(decoded, exact.double() * gamma, rtol=0, atol=1e-9)
    # and that sum is the clipped updates' sum plus noise of variance n sigma^2 (and rounding)
    clipped = torch.stack([ddg.clip_l2(u, clip) for u in updates]).sum(0)
    residual = decoded - clipped
    expected_var = n * sigma**2 + n * gamma**2 / 4
    assert 0.7 * expected_var < float(residual.var()) < 1.3 * expected_var


def test_too_few_bits_wrap_and_the_wrap_is_counted():
    bits, gamma = 5, 0.01  # the ring holds -0.16 ... 0.15: the sum leaves it
    _, shares, exact = _shares(20, 300, bits, sigma=0.05, gamma=gamma)
    wrapped = (exact < -(2 ** (bits - 1))) | (exact >= 2 ** (bits - 1))
    assert ddg.wraps(exact, bits) == int(wrapped.sum()) > 0
    error = ddg.decode(ddg.ring_sum(shares, bits), gamma, bits) / gamma - exact.double()
    assert torch.all(error[~wrapped].abs() < 1e-9)
    turns = error[wrapped] / 2**bits  # off by whole turns of the ring, never by less
    assert torch.all((turns - turns.round()).abs() < 1e-9) and torch.all(turns.abs() >= 1 - 1e-9)


def test_a_share_carries_its_noise():
    """The attack a missing noise share allows: with the noise removed the share minus the
    rounded update is zero, so the sum of the others' shares is all that protects it. Each
    share must deviate from its rounded update by N_Z(0, (sigma / gamma)^2)."""
    dim, gamma, sigma, bits = 20_000, 0.01, 0.05, 32
    u = torch.randn(dim, generator=torch.Generator().manual_seed(3))
    share = ddg.device_share(u, 1.0, gamma, sigma, 0.1, bits, _stream("r", 0), _stream("n", 0))
    x = ddg.clip_l2(u, 1.0) / gamma
    rounded = ddg.conditional_round(x, acc.rounded_l2_bound(1 / gamma, dim, 0.1), _stream("r", 0))
    half = 2 ** (bits - 1)
    noise = torch.remainder(share - rounded + half, 2**bits) - half
    assert abs(float(noise.double().var()) - (sigma / gamma) ** 2) < 0.05 * (sigma / gamma) ** 2


INTEGER_ORDERS = tuple(float(a) for a in range(2, 65))


def _gaussian_rdp(z: float, q: float, orders) -> np.ndarray:
    accountant = dpa.RdpAccountant(list(orders))
    event = dp_event.GaussianDpEvent(z)
    accountant.compose(event if q == 1 else dp_event.PoissonSampledDpEvent(q, event), 1)
    return np.asarray(accountant._rdp)  # noqa: SLF001 (its composed curve, by order)


@pytest.mark.parametrize("devices", [1, 10, 200])
def test_without_the_discrete_terms_it_is_the_gaussian_of_dp_accounting(devices):
    """With each device's noise many lattice steps wide, tau vanishes (e^-(2 pi^2 s^2 k/(k+1)))
    and Proposition 14 is the Gaussian mechanism's RDP with the rounded sensitivity and the
    survivors' total noise: dp-accounting's GaussianDpEvent at that noise multiplier."""
    clip, gamma, sigma, dim, beta = 1.0, 1e-3, 0.8, 10_000, math.exp(-0.5)
    assert acc.tau(sigma / gamma, devices) < 1e-300
    ours = acc.ddg_rdp(1.0, clip, gamma, sigma, devices, dim, beta, INTEGER_ORDERS)
    l2 = acc.rounded_l2_bound(clip / gamma, dim, beta) * gamma  # back in the update's units
    z = math.sqrt(devices) * sigma / l2
    np.testing.assert_allclose(ours, _gaussian_rdp(z, 1.0, INTEGER_ORDERS), rtol=1e-12)


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5])
def test_sampling_is_an_upper_bound_on_dp_accountings_exact_sampled_gaussian(q):
    """Zhu and Wang's general bound (Theorem 5, valid for any mechanism), where tau vanishes:
    never below the exact RDP of the Poisson-sampled Gaussian (dp-accounting), never above the
    unsampled one, equal to it at order 2. It is loose above order 2 (up to ~14x here at
    q = 0.01): a utility cost, not a privacy one; ignoring the sampling would be ~1000x."""
    clip, gamma, sigma, dim, beta, devices = 1.0, 1e-3, 1.0, 1000, 0.01, 50
    ours = acc.ddg_rdp(q, clip, gamma, sigma, devices, dim, beta, INTEGER_ORDERS)
    l2 = acc.rounded_l2_bound(clip / gamma, dim, beta) * gamma
    z = math.sqrt(devices) * sigma / l2
    exact = _gaussian_rdp(z, q, INTEGER_ORDERS)
    assert np.all(ours >= exact * (1 - 1e-9))
    assert np.all(ours <= _gaussian_rdp(z, 1.0, INTEGER_ORDERS) * (1 + 1e-12))
    assert ours[0] == pytest.approx(exact[0], rel=1e-9)
    assert np.all(ours <= 20 * exact)


def test_narrow_noise_costs_more_and_fractional_orders_take_the_next_integer():
    wide = acc.ddg_rdp(1.0, 1.0, 0.1, 1.0, 10, 100, 0.01, (1.5, 2.0, 3.0))
    narrow = acc.ddg_rdp(1.0, 1.0, 0.5, 1.0, 10, 100, 0.01, (1.5, 2.0, 3.0))
    assert acc.tau(1.0 / 0.5, 10) > acc.tau(1.0 / 0.1, 10)
    assert np.all(narrow > wide)
    assert wide[0] == wide[1]  # order 1.5 is bounded by order 2
    # more guaranteed survivors, more noise in the sum: less privacy spent
    many = acc.ddg_rdp(1.0, 1.0, 0.1, 1.0, 100, 100, 0.01, (2.0,))
    assert many[0] < wide[1]


def test_the_event_is_accounted_by_the_ledger_as_its_curve_says(tmp_path):
    """The event the device records (privacy/events.py): its curve is count x ddg_rdp, it
    round-trips through JSON, the service's pool prices it, and the ledger's epsilon is the
    RDP conversion of that curve (a device's ledger refuses the round that would exceed it)."""
    from privfed.privacy.accountant import epsilon_from_rdp
    from privfed.privacy.events import ORDERS, DistributedDiscreteGaussianEvent, event_from_json
    from privfed.privacy.ledger import EventKey, Ledger
    from privfed.privacy.service.pricing import pool_of

    event = DistributedDiscreteGaussianEvent(
        q=0.05, clip=1.0, gamma=1e-3, sigma=0.6, devices=40, dim=5000, beta=0.01, count=2
    )
    one = acc.ddg_rdp(0.05, 1.0, 1e-3, 0.6, 40, 5000, 0.01, ORDERS)
    np.testing.assert_allclose(event.rdp(), 2 * one, rtol=1e-15)
    assert event_from_json(event.to_json()) == event and pool_of(event) == "fast"
    ledger = Ledger(tmp_path / "device.sqlite")
    ledger.set_budget("device", 50.0, 1e-6, "rdp")
    answer = ledger.report(EventKey("run", "device", 1), event)
    assert answer.accepted
    assert answer.epsilon_spent == pytest.approx(epsilon_from_rdp(2 * one, 1e-6, ORDERS)[0])
    ledger.set_budget("tight", answer.epsilon_spent * 1.1, 1e-6, "rdp")
    assert ledger.report(EventKey("run", "tight", 1), event).accepted
    assert not ledger.plan("tight", event).accepted  # a second round would exceed it
