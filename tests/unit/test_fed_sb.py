"""Fed-SB on LoRA-SB: the module, its per-sample gradients under Opacus, exact aggregation of R,
the r x r upload, both initialisations, and the charged DP init release."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample.utils import wrap_model

from privfed import keys
from privfed.client.app import train_round
from privfed.models.backbone import adapter_names, build_model, forward_logits, set_trainable
from privfed.models.lora_sb import LoraSBLinear, random_orthonormal, svd_factors
from privfed.privacy.gradients import clipped_gradient_sum
from privfed.strategies.fed_sb import FedSB, aggregate_r, is_sb_r, sb_triples, svd_init
from privfed.strategies.registry import build_strategy

from ..helpers import TINY, make_round, run_config
from .test_dp_sgd import per_example_grads, setup  # noqa: F401  (a shared fixture)

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_module_adds_scaled_b_r_a_to_the_frozen_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoraSBLinear(base, r=3, alpha=6.0)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer(x), base(x))  # R = 0: the base model is unchanged
    with torch.no_grad():
        layer.sb_R.weight.normal_()
    expected = base(x) + 2.0 * x @ (layer.sb_B.weight @ layer.sb_R.weight @ layer.sb_A.weight).T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(
        layer.delta_weight(), 2.0 * layer.sb_B.weight @ layer.sb_R.weight @ layer.sb_A.weight
    )


def test_rank_larger_than_the_matrix_is_refused():
    with pytest.raises(ValueError, match="model.lora.r"):
        LoraSBLinear(torch.nn.Linear(4, 3), r=4, alpha=1.0)


def test_random_init_is_orthonormal_and_identical_from_the_same_seed():
    cfg = run_config(*TINY, "strategy=fed_sb", "strategy.init=random")
    m1 = build_model(cfg.model, 5, seed=0, vocab_size=30522, adapter="lora_sb")
    m2 = build_model(cfg.model, 5, seed=0, vocab_size=30522, adapter="lora_sb")
    layers = [m for m in m1.modules() if isinstance(m, LoraSBLinear)]
    assert layers
    for layer in layers:
        b, a = layer.sb_B.weight.double(), layer.sb_A.weight.double()
        eye = torch.eye(b.shape[1], dtype=torch.float64)
        torch.testing.assert_close(b.T @ b, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, eye, atol=1e-5, rtol=0)
        assert torch.count_nonzero(layer.sb_R.weight) == 0
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_per_sample_gradients_of_r_equal_per_example_autograd(setup):  # noqa: F811
    cfg, _, batch = setup
    model = build_model(cfg.model, 5, seed=0, vocab_size=30522, adapter="lora_sb")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():  # R = 0 would make every gradient of the head trivial
        for n, p in model.named_parameters():
            if is_sb_r(n):
                p.normal_(0, 0.1)
    fed_sb = FedSB(run_config(*TINY, "strategy=fed_sb"))
    set_trainable(model, adapter_names(model), fed_sb.trainable)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_sb_r(n) or "classifier" in n for n in trainable)
    model.train()
    expected = per_example_grads(model, batch)
    gsm = wrap_model(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="sum")
    try:
        logits = forward_logits(gsm, batch.input_ids, batch.attention_mask)
        torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").backward()
        params = [p for p in model.parameters() if p.requires_grad]
        for j, p in enumerate(params):
            for i in range(len(batch)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)
    finally:
        gsm._close()


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 5), r=st.integers(1, 4), d=st.integers(4, 9), seed=st.integers(0, 9999))
def test_aggregated_product_is_exact(k, r, d, seed):
    g = torch.Generator().manual_seed(seed)
    names = ("m.sb_B.weight", "m.sb_R.weight", "m.sb_A.weight")
    b, a = random_orthonormal(d, r, g), random_orthonormal(d + 1, r, g).T
    state = {names[0]: b, names[1]: torch.zeros(r, r), names[2]: a}
    payloads = [{names[1]: torch.randn(r, r, generator=g)} for _ in range(k)]
    weights = [float(w) for w in torch.randint(1, 20, (k,), generator=g)]
    new = aggregate_r(state, payloads, weights)
    assert torch.equal(new[names[0]], b) and torch.equal(new[names[2]], a)
    exact = sum(
        w * b.double() @ p[names[1]].double() @ a.double()
        for w, p in zip(weights, payloads, strict=True)
    ) / sum(weights)
    got = b.double() @ new[names[1]].double() @ a.double()
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-6)
    cfg = run_config(*TINY, "strategy=fed_sb")
    assert FedSB(cfg).round_metrics(state, payloads, weights)["aggregation_error"] < 1e-12


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 4), d_out=st.integers(4, 9), d_in=st.integers(4, 9), s=st.floats(0.5, 4))
def test_svd_factors_are_the_best_rank_r_approximation(r, d_out, d_in, s):
    dw = torch.randn(d_out, d_in, dtype=torch.float64)
    b, rr, a = svd_factors(dw, r, s)
    u, sig, vh = torch.linalg.svd(dw)
    truncated = u[:, :r] @ torch.diag(sig[:r]) @ vh[:r]
    torch.testing.assert_close(
        s * b.double() @ rr.double() @ a.double(), truncated, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        b.double().T @ b.double(), torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_svd_init_factors_the_mean_gradient_of_all_clients():
    g = torch.Generator().manual_seed(1)
    state = {
        "m.sb_B.weight": torch.zeros(6, 2),
        "m.sb_R.weight": torch.zeros(2, 2),
        "m.sb_A.weight": torch.zeros(2, 5),
    }
    sums = [{"m.base_layer.weight": torch.randn(6, 5, generator=g)} for _ in range(3)]
    new = svd_init(state, sums, [10, 20, 30], rank=2, scaling=2.0, init_scale=0.5)
    target = -0.5 * sum(s["m.base_layer.weight"].double() for s in sums) / 60
    u, sig, vh = torch.linalg.svd(target)
    got = (
        2.0
        * new["m.sb_B.weight"].double()
        @ new["m.sb_R.weight"].double()
        @ new["m.sb_A.weight"].double()
    )
    torch.testing.assert_close(got, u[:, :2] @ torch.diag(sig[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("clip", ["l2", "linf"])
def test_clipped_gradient_sum_equals_independent_clipping(setup, clip):  # noqa: F811
    cfg, _, batch = setup
    model = build_model(cfg.model, 5, seed=0, vocab_size=30522, adapter="lora_sb")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    names = [n for n, _ in model.named_parameters() if n.endswith("query.base_layer.weight")][:2]
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in names)
    expected = {n: torch.zeros_like(params[n]) for n in names}
    bound = 0.01 if clip == "l2" else 1e-4
    for grads in per_example_grads(model, batch):
        per = dict(zip(names, grads, strict=True))
        if clip == "l2":
            norm = torch.sqrt(sum(g.pow(2).sum() for g in per.values()))
            assert norm > bound  # the bound really clips
            for n in names:
                expected[n] += per[n] * min(1.0, bound / float(norm))
        else:
            for n in names:
                expected[n] += per[n].clamp(-bound, bound)
    got = clipped_gradient_sum(model, batch, names, clip, bound, batch_size=2)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7)


def test_a_real_client_trains_only_r_and_sends_r_and_the_head(tmp_path):
    from privfed.privacy.ledger import Ledger

    r = 6  # Fed-SB's own rank (strategy.rank), not the model's LoRA rank (4)
    cfg = run_config(
        *TINY,
        "strategy=fed_sb",
        "strategy.init=random",
        f"strategy.rank={r}",
        "train.batch_size=16",
    )
    assert isinstance(build_strategy(cfg), FedSB)
    msg, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", 100.0, 1e-5)
    reply = train_round(cfg, msg, context)
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    triples = sb_triples(list(state))
    assert triples
    # Nothing but R (r x r per adapted matrix) and the head leaves the client.
    assert set(payload) == {t[1] for t in triples} | {n for n in state if "classifier" in n}
    assert all(payload[t[1]].shape == (r, r) for t in triples)
    assert any(not torch.equal(payload[t[1]], state[t[1]]) for t in triples)


def test_the_svd_init_release_is_charged_once_and_clipped(tmp_path):
    from privfed.privacy.events import GaussianEvent
    from privfed.privacy.ledger import Ledger

    cfg = run_config(*TINY, "strategy=fed_sb", "strategy.init_noise_multiplier=1e-4")
    msg, context, state, data = make_round(tmp_path, cfg, 0, 1.0)
    msg.content.config_records[keys.CONFIG][keys.PHASE] = keys.PHASE_INIT
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", 1e12, 1e-5)
    reply = train_round(cfg, msg, context)
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    assert set(payload) == set(FedSB(cfg).init_gradient_names(state))
    # almost no noise (std 1e-4 C): the sum of n clipped gradients has norm <= n * C
    norm = torch.sqrt(sum(t.pow(2).sum() for t in payload.values()))
    assert 0 < float(norm) <= len(data.client(0)) * cfg.privacy.max_grad_norm + 0.01
    events = ledger.events("client-0")
    assert events == [GaussianEvent(sigma=1e-4)]
    again = train_round(cfg, msg, context)  # a re-run re-sends the stored release, charges nothing
    assert ledger.events("client-0") == events
    torch.testing.assert_close(
        again.content.array_records[keys.ARRAYS].to_torch_state_dict(), payload
    )


def test_bad_init_is_refused_before_start():
    from privfed.cli import prepare
    from privfed.config import ConfigError

    from ..helpers import compose_raw

    with pytest.raises(ConfigError, match="strategy.init"):
        prepare(compose_raw(*TINY, "strategy=fed_sb", "strategy.init=magic"))


def test_the_default_init_noise_spends_a_fifth_of_even_a_small_budget():
    from privfed.cli import prepare
    from privfed.privacy.accountant import epsilon
    from privfed.privacy.events import GaussianEvent

    from ..helpers import compose_raw

    cfg, sigma = prepare(compose_raw(*TINY, "strategy=fed_sb", "privacy.epsilon=1"))
    init = FedSB(cfg).init_sigma
    assert epsilon([GaussianEvent(init)], 1e-5) <= 0.2 * 1.0
    assert epsilon([GaussianEvent(init / 1.01)], 1e-5) > 0.2 * 1.0
    assert sigma is not None and sigma > 0


def test_fed_sb_rank_is_its_own_and_keeps_the_models_scaling():
    from privfed.models.lora_sb import LoraSBLinear

    for rank, want in ((None, 4), (4, 4), (12, 12)):
        cfg = run_config(
            *TINY, "strategy=fed_sb", f"strategy.rank={'null' if rank is None else rank}"
        )
        model_cfg = build_strategy(cfg).model_config
        assert model_cfg.lora.r == want
        # alpha / r: the model's LoRA scaling (8 / 4), whatever the rank
        assert model_cfg.lora.alpha / model_cfg.lora.r == cfg.model.lora.alpha / cfg.model.lora.r
        model = build_model(model_cfg, 5, seed=0, vocab_size=30522, adapter="lora_sb")
        modules = [m for m in model.modules() if isinstance(m, LoraSBLinear)]
        assert modules and all(m.sb_R.weight.shape == (want, want) for m in modules)
        assert all(m.scaling == 2.0 for m in modules)
