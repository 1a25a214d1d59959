"""privfed/randomness.py: secret streams are fresh and cannot leave the process; public streams
repeat and are separate per purpose; the draws have the distributions they claim."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from privfed.randomness import RandomStream, public_seed


def test_secret_streams_are_fresh_and_public_ones_repeat():
    a, b = RandomStream.secret("noise"), RandomStream.secret("noise")
    assert not torch.equal(a.uniform(64), b.uniform(64))
    p, q = RandomStream.public(0, "noise", 1, 2), RandomStream.public(0, "noise", 1, 2)
    assert torch.equal(p.uniform(64), q.uniform(64))
    assert p.is_secret is False and a.is_secret is True


@given(
    seed=st.integers(0, 2**40),
    ids=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
)
@settings(max_examples=50, deadline=None)
def test_public_streams_differ_by_purpose_seed_and_ids(seed, ids):
    """No two purposes, clients or rounds share draws (the old ``seed + k`` offsets did: round
    r's noise seed was round r + 1's sampling seed)."""
    base = RandomStream.public(seed, "dp_sgd.noise", *ids).uniform(8)
    others = [
        RandomStream.public(seed, "dp_sgd.sampling", *ids),
        RandomStream.public(seed + 1, "dp_sgd.noise", *ids),
        RandomStream.public(seed, "dp_sgd.noise", *ids[:-1], ids[-1] + 1),
        RandomStream.public(seed, "dp_sgd.noise", *ids, 0),
    ]
    for other in others:
        assert not torch.equal(base, other.uniform(8))
    assert public_seed(seed, "a", *ids) != public_seed(seed, "b", *ids)
    assert 0 <= public_seed(seed, "a", *ids) < 2**63


def test_a_stream_cannot_be_pickled_or_copied():
    """Its key would travel with it (a checkpoint, a Ray message, a log)."""
    stream = RandomStream.secret("noise")
    with pytest.raises(TypeError, match="never leaves"):
        pickle.dumps(stream)
    with pytest.raises(TypeError):
        copy.deepcopy(stream)
    assert "key" not in repr(stream) and "secret" in repr(stream)


def test_normal_draws_are_standard_normal_with_the_requested_std():
    stream = RandomStream.public(1, "test")
    z = stream.normal((400_000,), std=2.5, dtype=torch.float64)
    assert z.dtype == torch.float64 and z.shape == (400_000,)
    assert stats.kstest(z.numpy() / 2.5, "norm").pvalue > 1e-3
    assert float(z.std()) == pytest.approx(2.5, rel=0.01)
    assert abs(float(z.mean())) < 5 * 2.5 / 400_000**0.5
    # Independent coordinates: neighbouring draws are uncorrelated.
    assert abs(np.corrcoef(z[:-1].numpy(), z[1:].numpy())[0, 1]) < 0.01
    shaped = stream.normal((3, 5, 7), std=1.0)
    assert shaped.shape == (3, 5, 7) and shaped.dtype == torch.float32


def test_uniform_and_bernoulli_draws():
    stream = RandomStream.public(2, "test")
    u = stream.uniform(200_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    hits = stream.bernoulli(200_000, 0.3)
    assert hits.dtype == torch.bool
    assert float(hits.double().mean()) == pytest.approx(0.3, abs=5 * (0.21 / 200_000) ** 0.5)


def test_torch_cpu_generators_keep_only_32_bits_of_their_seed():
    """Why a mechanism never draws from ``torch.Generator().manual_seed(secrets.randbits(64))``:
    seeds that differ only above bit 32 give the same stream, so a server could try them all."""
    low = torch.randn(8, generator=torch.Generator().manual_seed(12345))
    high = torch.randn(8, generator=torch.Generator().manual_seed(12345 + (7 << 40)))
    assert torch.equal(low, high)


def test_a_steps_noise_is_one_draw_cut_into_the_parameters_shapes():
    """The order the white-box auditor regenerates (privfed/audit/white_box.py): one draw over
    all coordinates, parameters in order; zeros, drawing nothing, without noise."""
    from privfed.privacy.opacus_streams import step_noise

    shapes = [(8, 3), (5,), (2, 2, 2)]
    noise = step_noise(RandomStream.public(4, "test"), shapes, 1.5)
    assert [tuple(t.shape) for t in noise] == shapes
    whole = RandomStream.public(4, "test").normal((37,), 1.5)
    assert torch.equal(torch.cat([t.flatten() for t in noise]), whole)
    stream = RandomStream.public(4, "test")
    assert all(not t.any() for t in step_noise(stream, shapes, 0.0))
    assert torch.equal(stream.uniform(4), RandomStream.public(4, "test").uniform(4))
