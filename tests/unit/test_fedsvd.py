"""FedSVD: B_new A_new = B_bar A_old, orthonormal A_new, and no dense d_out x d_in SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privfed.config import ConfigError
from privfed.strategies.fedsvd import FedSVD, refactor
from privfed.strategies.registry import build_strategy

from ..helpers import TINY, compose_raw, run_config


@settings(max_examples=40, deadline=None)
@given(
    r=st.integers(1, 6),
    d_out=st.integers(6, 40),
    d_in=st.integers(6, 40),
    seed=st.integers(0, 9999),
)
def test_refactor_preserves_the_product_and_orthonormalises_a(r, d_out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    b_bar, a = torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)
    b_new, a_new = refactor(b_bar, a)
    assert b_new.shape == (d_out, r) and a_new.shape == (r, d_in)
    torch.testing.assert_close(b_new @ a_new, b_bar @ a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a_new @ a_new.T, torch.eye(r), rtol=1e-5, atol=1e-5)


def test_refactor_matches_the_truncated_svd_of_the_product():
    g = torch.Generator().manual_seed(0)
    b_bar, a = torch.randn(30, 4, generator=g).double(), torch.randn(4, 25, generator=g).double()
    b_new, _ = refactor(b_bar, a)
    dense = torch.linalg.svdvals(b_bar @ a)[:4]  # oracle only: the code never does this
    torch.testing.assert_close(b_new.norm(dim=0), dense, rtol=1e-9, atol=1e-9)


def test_refactor_never_builds_a_dense_product(monkeypatch):
    calls = []
    real_svd = torch.linalg.svd

    def spy(m, *args, **kwargs):
        calls.append(tuple(m.shape))
        return real_svd(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    refactor(torch.randn(300, 4), torch.randn(4, 200))
    assert calls == [(4, 4)]


def test_server_round_refactors_every_k_rounds():
    strategy = build_strategy(run_config(*TINY, "strategy=fedsvd", "strategy.refactor_every=2"))
    assert isinstance(strategy, FedSVD)
    a = torch.randn(2, 5)
    state = {"m.lora_A.default.weight": a, "m.lora_B.default.weight": torch.zeros(5, 2)}
    payloads = [{"m.lora_B.default.weight": torch.randn(5, 2)} for _ in range(3)]
    first = strategy.aggregate(state, payloads, [1.0, 2.0, 3.0])
    assert torch.equal(first["m.lora_A.default.weight"], a)  # round 1: not re-factored
    second = strategy.aggregate(state, payloads, [1.0, 2.0, 3.0])
    a2 = second["m.lora_A.default.weight"]
    torch.testing.assert_close(a2 @ a2.T, torch.eye(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        second["m.lora_B.default.weight"] @ a2,
        first["m.lora_B.default.weight"] @ a,
        rtol=1e-4,
        atol=1e-5,
    )


def test_bad_refactor_every_fails_before_start():
    from privfed.cli import prepare

    with pytest.raises(ConfigError, match="strategy.refactor_every: Input should be greater"):
        prepare(compose_raw(*TINY, "strategy=fedsvd", "strategy.refactor_every=0"))
