"""FFA-LoRA: exact aggregation with a shared frozen A; on a real client, A never changes and
never travels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privfed import keys
from privfed.client.app import train_round
from privfed.strategies.ffa_lora import FFALoRA, aggregate_frozen_a
from privfed.strategies.lora import aggregation_error
from privfed.strategies.registry import build_strategy

from ..helpers import TINY, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 5), r=st.integers(1, 4), d=st.integers(2, 8), seed=st.integers(0, 9999))
def test_aggregated_product_is_exact_with_the_shared_a(k, r, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, d, generator=g)
    state = {"m.lora_A.default.weight": a, "m.lora_B.default.weight": torch.zeros(d, r)}
    payloads = [{"m.lora_B.default.weight": torch.randn(d, r, generator=g)} for _ in range(k)]
    weights = [float(w) for w in torch.randint(1, 20, (k,), generator=g)]
    new = aggregate_frozen_a(state, payloads, weights)
    assert torch.equal(new["m.lora_A.default.weight"], a)
    exact = sum(
        w * p["m.lora_B.default.weight"].double() @ a.double()
        for w, p in zip(weights, payloads, strict=True)
    ) / sum(weights)
    got = new["m.lora_B.default.weight"].double() @ a.double()
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
    num, den = aggregation_error([a] * k, [p["m.lora_B.default.weight"] for p in payloads], weights)
    assert num <= 1e-12 * max(den, 1.0)


def test_a_real_client_keeps_a_bit_identical_and_sends_only_b_and_the_head(tmp_path):
    from privfed.privacy.ledger import Ledger

    cfg = run_config(*TINY, "strategy=ffa_lora", "train.batch_size=16")
    assert isinstance(build_strategy(cfg), FFALoRA)
    msg, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", 100.0, 1e-5)
    reply = train_round(cfg, msg, context)
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    a_names = {n for n in state if ".lora_A." in n}
    assert a_names and not (a_names & set(payload))  # A never travels
    assert set(payload) == set(state) - a_names
    assert any(not torch.equal(payload[n], state[n]) for n in payload if ".lora_B." in n)


def test_local_training_leaves_a_bit_identical(tmp_path):
    from privfed.data.federated import federated_data
    from privfed.models.backbone import adapter_names, fresh_model, set_trainable
    from privfed.privacy.dp_sgd import RoundRandomness, train_local

    cfg = run_config(*TINY, "strategy=ffa_lora", "train.batch_size=16")
    data = federated_data(cfg)
    model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size)
    names = adapter_names(model)
    set_trainable(model, names, build_strategy(cfg).trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    train_local(model, data.client(0), cfg.train, cfg.privacy, 1.0, RoundRandomness.secret())
    after = dict(model.named_parameters())
    for n in names:
        if ".lora_A." in n:
            assert torch.equal(after[n], before[n]) and not after[n].requires_grad
    assert any(not torch.equal(after[n], before[n]) for n in names if ".lora_B." in n)
