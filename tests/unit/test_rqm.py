"""RQM: the exact output distribution against brute-force enumeration and a Monte-Carlo run of
the mechanism, unbiasedness, the RDP curve against a brute-force divergence, the packed upload,
both modes on a real client, and the accountant's view of its events."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privfed import keys
from privfed.client.app import train_round
from privfed.privacy.events import ORDERS, RQMEvent, event_from_json
from privfed.privacy.rqm import (
    dequantize,
    pack_indices,
    packed_size,
    quantize,
    unpack_indices,
)
from privfed.privacy.rqm_accounting import (
    bits_per_index,
    divergence_pairs,
    levels,
    output_distribution,
    rdp_per_coordinate,
)
from privfed.randomness import RandomStream
from privfed.strategies.base import InvalidReply
from privfed.strategies.rqm import RQM

from ..helpers import TINY, compose_raw, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def brute_force_distribution(x: float, c: float, delta: float, m: int, q: float) -> np.ndarray:
    """Enumerate every subset of kept interior levels (an independent implementation)."""
    x = min(max(x, -c), c)
    b = levels(c, delta, m)
    out = np.zeros(m)
    for mask in itertools.product([False, True], repeat=m - 2):
        kept = [0, *[j + 1 for j, k in enumerate(mask) if k], m - 1]
        prob = math.prod(q if k else 1 - q for k in mask)
        lo = max(j for j in kept if b[j] <= x)
        hi = min(j for j in kept if b[j] >= x)
        if lo == hi:
            out[lo] += prob
        else:
            up = (x - b[lo]) / (b[hi] - b[lo])
            out[hi] += prob * up
            out[lo] += prob * (1 - up)
    return out


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 7),
    q=st.floats(0.05, 1.0),
    c=st.floats(0.1, 3.0),
    ext=st.floats(0.05, 2.0),
    u=st.floats(-1.2, 1.2),
)
def test_exact_distribution_equals_enumeration_and_is_unbiased(m, q, c, ext, u):
    x = u * c
    delta = ext * c
    got = output_distribution(np.array([x]), c, delta, m, q)[0]
    np.testing.assert_allclose(got, brute_force_distribution(x, c, delta, m, q), atol=1e-12)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    assert float(got @ levels(c, delta, m)) == pytest.approx(min(max(x, -c), c), abs=1e-9)


def test_exact_distribution_on_a_level_equals_enumeration():
    c, delta, m, q = 1.0, 0.5, 7, 0.3
    for x in levels(c, delta, m)[1:-1]:
        if -c <= x <= c:
            np.testing.assert_allclose(
                output_distribution(np.array([x]), c, delta, m, q)[0],
                brute_force_distribution(float(x), c, delta, m, q),
                atol=1e-12,
            )


@pytest.mark.parametrize("x", [-0.93, -0.2, 0.0, 0.37, 1.0])
def test_monte_carlo_run_of_the_mechanism_matches_the_exact_distribution(x):
    c, delta, m, q, n = 1.0, 0.5, 8, 0.4, 200_000
    idx = quantize(torch.full((n,), x), c, delta, m, q, RandomStream.public(7, "test"))
    counts = np.bincount(idx.numpy(), minlength=m)
    expected = output_distribution(np.array([x]), c, delta, m, q)[0] * n
    keep = expected > 5  # the chi-square approximation's usual rule
    assert counts[~keep].sum() <= max(20.0, 3 * expected[~keep].sum() + 10)
    chi2 = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    p_value = stats.chi2.sf(chi2, df=int(keep.sum()) - 1)
    assert p_value > 1e-3, (counts, expected)
    mean = float(dequantize(idx, c, delta, m).double().mean())
    assert mean == pytest.approx(x, abs=4 * 2 * (c + delta) / math.sqrt(n))


def brute_force_rdp(c, delta, m, q, sensitivity, alpha) -> float:
    xs, x_prime = divergence_pairs(c, delta, m, sensitivity)
    best = 0.0
    for i, x in enumerate(xs):
        p = brute_force_distribution(float(x), c, delta, m, q)
        for xp in x_prime[i]:
            r = brute_force_distribution(float(xp), c, delta, m, q)
            for a, b in ((p, r), (r, p)):
                d = math.log(
                    sum(pa**alpha * pb ** (1 - alpha) for pa, pb in zip(a, b, strict=True))
                ) / (alpha - 1)
                best = max(best, d)
    return best


def test_rdp_curve_equals_a_brute_force_divergence_on_a_small_m():
    c, delta, m, q, sens = 1.0, 0.5, 5, 0.5, 0.3
    orders = (2.0, 4.0, 16.0)
    curve = rdp_per_coordinate(c, delta, m, q, sens, orders)
    for alpha, value in zip(orders, curve, strict=True):
        assert value == pytest.approx(brute_force_rdp(c, delta, m, q, sens, alpha), rel=1e-9)
    assert np.all(np.diff(curve) > 0)  # RDP grows with the order


def test_rdp_curve_bounds_random_pairs_off_the_grid():
    c, delta, m, q, sens = 1.0, 0.5, 5, 0.5, 0.3
    curve = rdp_per_coordinate(c, delta, m, q, sens, (2.0, 8.0))
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = rng.uniform(-c, c)
        xp = float(np.clip(x + rng.uniform(-sens, sens), -c, c))
        p, r = (brute_force_distribution(v, c, delta, m, q) for v in (x, xp))
        for alpha, bound in zip((2.0, 8.0), curve, strict=True):
            d = math.log(sum(a**alpha * b ** (1 - alpha) for a, b in zip(p, r, strict=True))) / (
                alpha - 1
            )
            assert d <= bound * (1 + 0.02) + 1e-12  # the grid's maximum, to 2%


def test_more_levels_kept_means_less_privacy():
    args = (1.0, 0.5, 8)
    tight = rdp_per_coordinate(*args, 0.2, 0.1, (2.0,))[0]
    loose = rdp_per_coordinate(*args, 0.8, 0.1, (2.0,))[0]
    assert 0 < tight < loose


def test_rqm_event_composes_over_coordinates_and_round_trips():
    one = RQMEvent(c=1.0, delta=0.5, m=8, q=0.5, sensitivity=0.01, dims=1)
    many = RQMEvent(c=1.0, delta=0.5, m=8, q=0.5, sensitivity=0.01, dims=1000, count=3)
    np.testing.assert_allclose(many.rdp(), 3000 * one.rdp())
    assert event_from_json(many.to_json()) == many
    assert many.rdp().shape == (len(ORDERS),)
    for bad in ({"q": 1.5}, {"m": 1}, {"sensitivity": -1.0}, {"c": float("nan")}, {"dims": 0}):
        with pytest.raises(ValueError):
            RQMEvent(**{**vars(one), **bad})


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 256), n=st.integers(1, 300), seed=st.integers(0, 999))
def test_packing_round_trips_with_ceil_log2_m_bits(m, n, seed):
    idx = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_indices(idx, m)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(n, m) == math.ceil(n * bits_per_index(m) / 8)
    assert torch.equal(unpack_indices(packed, m, n), idx)


def test_compress_mode_on_a_real_client_uploads_packed_indices_only(tmp_path):
    from privfed.privacy.ledger import Ledger

    cfg = run_config(*TINY, "strategy=rqm", "train.batch_size=16")
    msg, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", 100.0, 1e-5)
    reply = train_round(cfg, msg, context)
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    assert set(payload) == set(state) | {n + "::scale" for n in state}
    for name, ref in state.items():
        assert payload[name].dtype == torch.uint8
        assert payload[name].numel() == packed_size(ref.numel(), 16)  # 4 bits per coordinate
    # The server decodes what the client's DP-SGD update was, to within a quantization step.
    strategy = RQM(cfg)
    strategy.global_state = state
    strategy.check_payload(payload, state)
    new = strategy.aggregate(state, [payload], [1.0])
    changed = [n for n in state if not torch.equal(new[n], state[n])]
    assert changed


def test_a_reply_with_out_of_range_levels_is_rejected():
    cfg = run_config(*TINY, "strategy=rqm", "strategy.levels=5")  # 3 bits: values 5..7 are invalid
    strategy = RQM(cfg)
    state = {"w": torch.zeros(4)}
    bad = {"w": pack_indices(torch.tensor([0, 1, 7, 2]), 5), "w::scale": torch.tensor(1.0)}
    with pytest.raises(InvalidReply, match="level index"):
        strategy.check_payload(bad, state)


def test_privacy_mode_charges_an_rqm_curve_and_sends_indices(tmp_path):
    from privfed.privacy.ledger import Ledger

    cfg = run_config(
        *TINY,
        "strategy=rqm",
        "strategy.mode=privacy",
        "strategy.keep_prob=0.5",
        "privacy.epsilon=1e6",
    )
    msg, context, state, data = make_round(tmp_path, cfg, 1, 1.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", 1e6, 1e-5)
    reply = train_round(cfg, msg, context)
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    assert set(payload) == set(state) and all(t.dtype == torch.uint8 for t in payload.values())
    (event,) = ledger.events("client-0")
    n = len(data.client(0))
    assert event == RQMEvent(
        c=0.01,
        delta=0.0025,
        m=16,
        q=0.5,
        sensitivity=0.02 / n,
        dims=sum(t.numel() for t in state.values()),
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("strategy.levels=1", "strategy.levels"),
        ("strategy.keep_prob=0", "strategy.keep_prob"),
        ("strategy.keep_prob=1.5", "strategy.keep_prob"),
        ("strategy.mode=fast", "strategy.mode"),
        ("strategy.range_extension=-1", "strategy.range_extension"),
    ],
)
def test_bad_rqm_parameters_fail_before_start(override, key):
    from privfed.cli import prepare
    from privfed.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        prepare(compose_raw(*TINY, "strategy=rqm", override))


def test_privacy_mode_budget_it_cannot_meet_is_refused_with_its_real_epsilon():
    from privfed.cli import prepare
    from privfed.config import ConfigError

    with pytest.raises(ConfigError, match=r"rqm in privacy mode spends epsilon=\d"):
        prepare(
            compose_raw(*TINY, "strategy=rqm", "strategy.mode=privacy", "strategy.keep_prob=0.5")
        )
