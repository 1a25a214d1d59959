"""DP-SGD on the real backbone's LoRA layers, checked against independent computations:
per-example autograd, the clipping rule, the noise formula, and a canary through a client round."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from opacus.grad_sample.utils import wrap_model
from opacus.optimizers import get_optimizer_class

from privfed.config import PrivacyConfig
from privfed.data.datasets import TokenizedSplit
from privfed.models.backbone import adapter_names, build_model, forward_logits, load_tokenizer
from privfed.privacy.dp_sgd import RoundRandomness, per_layer_bounds, train_local
from privfed.privacy.invariants import PrivacyInvariantError
from privfed.privacy.opacus_streams import dp_optimizer
from privfed.randomness import RandomStream

from ..helpers import ONE_SGD_STEP, dp_privacy, run_config

TEXTS = [
    "Shares in the bank rose sharply after record profits were announced.",
    "The striker scored twice as the club won the cup final.",
    "Ministers will debate the new education bill in parliament next week.",
    "The film won three awards at the ceremony on Sunday night.",
    "A new smartphone chip promises faster and cheaper mobile internet.",
]


@pytest.fixture(scope="module")
def setup():
    cfg = run_config("model=minilm_lora")
    tok = load_tokenizer(cfg.model)
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    batch = TokenizedSplit(enc["input_ids"], enc["attention_mask"], torch.tensor([0, 1, 2, 3, 4]))
    model = build_model(cfg.model, 5, seed=0, vocab_size=len(tok))
    # Opacus needs train mode; without dropout the batched and per-example passes are comparable.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():  # B starts at zero: give it values so every gradient is non-trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return cfg, model, batch


def dp(C: float, clipping: str, mode: str = "hooks") -> PrivacyConfig:
    """DP-SGD settings with clipping bound C (the budget is not used by these tests)."""
    return dp_privacy(
        epsilon=1.0, delta=1e-5, max_grad_norm=C, clipping=clipping, grad_sample_mode=mode
    )


def per_example_grads(model, batch) -> list[list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(len(batch)):
        model.zero_grad(set_to_none=True)
        logits = forward_logits(model, batch.input_ids[i : i + 1], batch.attention_mask[i : i + 1])
        torch.nn.functional.cross_entropy(logits, batch.labels[i : i + 1]).backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_equal_per_example_autograd(setup, mode):
    _, model, batch = setup
    model.train()
    expected = per_example_grads(model, batch)
    gsm = wrap_model(model, grad_sample_mode=mode, batch_first=True, loss_reduction="sum")
    try:
        logits = forward_logits(gsm, batch.input_ids, batch.attention_mask)
        torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").backward()
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == len(adapter_names(model)) > 4
        for j, p in enumerate(params):
            for i in range(len(batch)):
                torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-6)
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_clipped_sum_matches_independent_clipping(setup, clipping):
    cfg, model, batch = setup
    model.train()
    C = 0.05  # well below the examples' gradient norms: every example is clipped
    privacy = dp(C, clipping)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = per_example_grads(model, batch)
    bounds = (
        per_layer_bounds([p.shape for p in params], privacy) if clipping == "per_layer" else None
    )
    if bounds:
        assert sum(b * b for b in bounds) == pytest.approx(C * C)

    expected = [torch.zeros_like(p) for p in params]
    for g in grads:
        if bounds is None:
            norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
            assert norm > 10 * C
            factors = [min(1.0, C / (norm + 1e-6))] * len(g)
            clipped_norm = math.sqrt(
                sum(float((f * t).pow(2).sum()) for f, t in zip(factors, g, strict=True))
            )
            assert clipped_norm <= C * (1 + 1e-5)
        else:
            factors = [
                min(1.0, b / (float(t.norm()) + 1e-6)) for b, t in zip(bounds, g, strict=True)
            ]
            assert all(
                float((f * t).norm()) <= b * (1 + 1e-5)
                for f, t, b in zip(factors, g, bounds, strict=True)
            )
        for e, f, t in zip(expected, factors, g, strict=True):
            e += f * t

    gsm = wrap_model(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="sum")
    opt = get_optimizer_class(clipping, False, "hooks")(
        torch.optim.SGD(params, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=bounds if bounds else C,
        expected_batch_size=len(batch),
        loss_reduction="sum",
    )
    try:
        logits = forward_logits(gsm, batch.input_ids, batch.attention_mask)
        torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").backward()
        opt.clip_and_accumulate()
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.summed_grad, e, rtol=1e-3, atol=1e-7)
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_noise_std_on_zero_gradient_batch_is_sigma_times_c(setup, clipping):
    """privfed's optimizer (Opacus', its noise from a secret stream): N(0, (sigma C)^2) per
    coordinate of the sum, divided by the expected batch size; fresh on every step."""
    _, model, batch = setup
    model.train()
    sigma, C, B = 1.7, 0.5, 4
    privacy = dp(C, clipping)
    params = [p for p in model.parameters() if p.requires_grad]
    bounds = per_layer_bounds([p.shape for p in params], privacy) if clipping == "per_layer" else C
    gsm = wrap_model(model, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
    opt = dp_optimizer(
        torch.optim.SGD(params, lr=0.0),
        clipping=clipping,
        grad_sample_mode="hooks",
        noise_multiplier=sigma,
        max_grad_norm=bounds,
        expected_batch_size=B,
        noise_stream=RandomStream.secret("dp_sgd.noise"),
    )
    try:
        draws = []
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            logits = forward_logits(gsm, batch.input_ids, batch.attention_mask)
            (logits * 0.0).sum().backward()  # every per-example gradient is exactly zero
            opt.step()
            draws.append(torch.cat([p.grad.flatten() for p in params]))
        noise = draws[0]
        assert noise.numel() > 50_000
        assert float(noise.mean()) == pytest.approx(
            0.0, abs=5 * sigma * C / B / noise.numel() ** 0.5
        )
        # std of N(0, (sigma C)^2) / B, within 3% (the standard error here is ~0.3%)
        assert float(noise.std()) == pytest.approx(sigma * C / B, rel=0.03)
        assert abs(float(torch.corrcoef(torch.stack(draws))[0, 1])) < 0.02  # fresh each step
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)


class AlwaysEmptySamplingFake:
    """A fake sampling stream (unit test only): no example is ever sampled."""

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.bool)


@pytest.mark.parametrize(
    "clipping,mode", [("flat", "hooks"), ("per_layer", "hooks"), ("flat", "ghost")]
)
def test_an_empty_poisson_batch_releases_the_noise_of_an_empty_sum(setup, clipping, mode):
    """DP-SGD's empty batches are steps: nothing to clip, the noise alone, and they count.
    q = 1/5 with 5 examples: 5 steps, expected batch size 1, all empty here."""
    _, model, batch = setup
    C, sigma = 0.5, 2.0
    privacy = dp(C, clipping, mode)
    names = adapter_names(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    draws = RoundRandomness(AlwaysEmptySamplingFake(), RandomStream.secret("noise"), 0)
    try:
        result = train_local(model, batch, ONE_SGD_STEP, privacy, sigma, draws)  # type: ignore[arg-type]
        assert result.steps == 5 and result.event is not None and result.event.steps == 5
        assert math.isnan(result.mean_loss)  # no example was ever forwarded
        params = dict(model.named_parameters())
        update = torch.cat([(params[n].detach() - start[n]).flatten() for n in names])
        # SGD with lr 1 over 5 steps of (0 + N(0, (sigma C)^2)) / 1
        assert float(update.std()) == pytest.approx(sigma * C * 5**0.5, rel=0.03)
        assert float(update.mean()) == pytest.approx(
            0.0, abs=5 * sigma * C * 5**0.5 / update.numel() ** 0.5
        )
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])


@pytest.mark.parametrize(
    "clipping,mode",
    [("flat", "hooks"), ("per_layer", "hooks"), ("flat", "functorch"), ("flat", "ghost")],
)
def test_canary_update_leaving_a_client_is_clipped_and_noised(setup, clipping, mode):
    """One huge-gradient example, one SGD step with lr 1 through the client trainer: the update
    equals -(clipped gradient + noise); without noise its norm is at most C."""
    cfg, model, batch = setup
    canary = batch.subset([0])
    C, sigma = 1e-3, 2.0
    train = ONE_SGD_STEP
    privacy = dp(C, clipping, mode)
    names = adapter_names(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    raw_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in per_example_grads(model, canary)[0]))
    assert raw_norm > 100 * C  # the canary's own gradient is huge

    def update(noise: float) -> torch.Tensor:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        result = train_local(model, canary, train, privacy, noise, RoundRandomness.secret())
        assert result.steps == 1 and result.event is not None and result.event.q == 1.0
        params = dict(model.named_parameters())
        return torch.cat([(params[n].detach() - start[n]).flatten() for n in names])

    clipped = update(1e-9)  # (sigma must be > 0 for an event; 1e-9 C is far below float noise)
    assert float(clipped.norm()) <= C * (1 + 1e-4)
    assert float(clipped.norm()) >= C * 0.99  # clipped to the bound, not zeroed
    noised = update(sigma)
    noise = noised - clipped
    assert float(noise.std()) == pytest.approx(sigma * C, rel=0.03)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])


def test_dp_without_a_noise_multiplier_raises_even_under_python_O(setup):
    """The invariant is a raise, not an assert: ``python -O`` would drop an assert and train
    without noise. In process, and in a subprocess run with -O."""
    _, model, batch = setup
    with pytest.raises(PrivacyInvariantError, match="noise multiplier"):
        train_local(model, batch, ONE_SGD_STEP, dp(1.0, "flat"), None, RoundRandomness.secret())
    code = (
        "from privfed.privacy.invariants import PrivacyInvariantError, required\n"
        "try:\n"
        "    required(None, 'the noise multiplier')\n"
        "except PrivacyInvariantError:\n"
        "    print('raised')\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "raised", out.stderr


def test_a_model_partly_in_eval_mode_trains_in_train_mode(setup):
    """train_local sets train mode only where it is missing (a worker's kept model has it);
    one submodule left in eval mode (dropout off, Opacus' train-mode check) is still caught."""
    _, model, batch = setup
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    dropout.eval()
    try:
        train_local(model, batch, ONE_SGD_STEP, dp(1.0, "flat"), 1.0, RoundRandomness.secret())
        assert all(m.training for m in model.modules())
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
