"""The head recipe (``recipe.trains=head``): the frozen encoder's cached features, the DP class
prototypes (their sensitivity, their noise against the Gaussian mechanism's formula, their
budget share against dp-accounting), full-batch DP gradient descent on the head (per-sample
gradients against per-example autograd), the held-out splits, and the config's refusals."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from opacus.grad_sample.utils import wrap_model
from scipy.optimize import brentq
from scipy.stats import norm

from privfed import keys
from privfed.client.app import train_round
from privfed.client.prototype_release import class_sums
from privfed.config import ConfigError
from privfed.data.datasets import load_text_dataset, train_test_split
from privfed.data.features import FeatureSplit, cached_features
from privfed.data.federated import federated_data
from privfed.models.head import LinearHead, prototype_head
from privfed.privacy.accountant import epsilon
from privfed.privacy.calibration import prototype_noise_multiplier, recipe_events
from privfed.privacy.dp_sgd import local_plan
from privfed.privacy.events import GaussianEvent, SampledGaussianEvent
from privfed.privacy.ledger import Ledger
from privfed.strategies.registry import supporting

from ..helpers import TINY, compose_raw, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")

HEAD = (*TINY, "recipe=head")


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang (2018): the exact epsilon of the Gaussian mechanism, sensitivity 1."""

    def gap(eps: float) -> float:
        return (
            norm.cdf(0.5 / sigma - eps * sigma)
            - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)
            - delta
        )

    return 0.0 if gap(0.0) <= 0 else brentq(gap, 0.0, 500.0)


def test_features_are_centred_by_the_validation_split_unit_norm_and_cached(tmp_path):
    cfg = run_config(*HEAD, f"data.cache_dir={tmp_path}")
    data = federated_data(cfg)
    assert isinstance(data.train, FeatureSplit) and isinstance(data.test, FeatureSplit)
    for split in (data.train, data.validation, data.test):
        torch.testing.assert_close(split.features.norm(dim=1), torch.ones(len(split)))
    cached = list(tmp_path.glob("features-*.pt"))
    assert len(cached) == 1  # computed once, on disk
    # independently: the encoder's raw features of the validation rows, centred by their own
    # mean (public data only), then unit norm
    raw = torch.load(cached[0])
    labels = load_text_dataset(cfg.data).labels
    _, val, _ = train_test_split(
        labels, cfg.data.test_fraction, cfg.data.split_seed, cfg.data.validation_fraction
    )
    x = raw[torch.as_tensor(val)] - raw[torch.as_tensor(val)].mean(0)
    torch.testing.assert_close(data.validation.features, x / x.norm(dim=1, keepdim=True))
    again = cached_features(cfg.model, _tokens(cfg), cfg.seed, data.vocab_size, str(tmp_path))
    assert torch.equal(again, raw)  # the cache, not a second computation


def _tokens(cfg):
    from privfed.data.datasets import tokenize
    from privfed.models.backbone import load_tokenizer

    raw = load_text_dataset(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    return tokenize(raw.texts, raw.labels, tokenizer, cfg.model.max_length, cfg.data.cache_dir)


def test_the_held_out_splits_are_disjoint_and_follow_the_split_seed_not_the_run_seed():
    labels = np.repeat(np.arange(5), 60)
    train, val, test = train_test_split(labels, 0.2, 0, 0.1)
    assert (
        not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))
    )
    assert len(train) + len(val) + len(test) == len(labels) and len(val) == 30 and len(test) == 60
    # the test split does not move with the validation fraction
    assert np.array_equal(train_test_split(labels, 0.2, 0, 0.0)[2], test)
    a = federated_data(run_config(*TINY, "seed=0"))
    b = federated_data(run_config(*TINY, "seed=5"))
    assert torch.equal(a.test.input_ids, b.test.input_ids)  # one test split for every seed
    assert torch.equal(a.validation.input_ids, b.validation.input_ids)


def test_class_sums_move_by_at_most_one_when_one_example_is_added():
    """The prototypes' sensitivity: every feature is clipped to norm 1, so adding (or removing)
    one example moves the release by at most 1 in L2, whatever its feature."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(20, 8, generator=gen) * 5  # not unit norm: the clip must bound it
    labels = torch.randint(0, 3, (20,), generator=gen)
    without = class_sums(FeatureSplit(feats[:-1], labels[:-1]), 3)
    with_it = class_sums(FeatureSplit(feats, labels), 3)
    assert float((with_it - without).norm()) <= 1.0 + 1e-9
    x = feats[:5] / feats[:5].norm(dim=1, keepdim=True)
    expected = torch.zeros(3, 8, dtype=torch.float64)
    for row, y in zip(x, labels[:5], strict=True):
        expected[y] += row.double()
    torch.testing.assert_close(class_sums(FeatureSplit(x, labels[:5]), 3), expected)


def test_the_prototypes_share_of_the_budget_is_exact_and_the_rest_is_the_rounds():
    cfg = run_config(*HEAD, "recipe.prototypes=true", "recipe.prototype_share=1", "num_rounds=0")
    sigma_all = prototype_noise_multiplier(cfg)
    assert sigma_all is not None
    # one Gaussian release with the whole budget: its exact epsilon is the target (from above)
    assert exact_gaussian_epsilon(sigma_all, 1e-5) == pytest.approx(8.0, abs=0.02)
    assert exact_gaussian_epsilon(sigma_all, 1e-5) <= 8.0 + 1e-9
    half = run_config(*HEAD, "recipe.prototypes=true", "recipe.prototype_share=0.5")
    assert prototype_noise_multiplier(half) == pytest.approx(sigma_all * math.sqrt(2), rel=1e-12)
    # the rounds' sigma is calibrated to what is left: prototypes + rounds compose to <= eps,
    # checked by dp-accounting's own PLD
    strategy_cfg = half
    from privfed.strategies.registry import build_strategy

    strategy = build_strategy(strategy_cfg)
    data = federated_data(strategy_cfg)
    sizes = data.sizes()
    sigma = strategy.calibrate_noise(data, strategy.new_model(data))
    assert sigma is not None and recipe_events(strategy_cfg) == [
        GaussianEvent(sigma=prototype_noise_multiplier(half))
    ]
    plan = local_plan(min(sizes), strategy_cfg.train)
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(prototype_noise_multiplier(half)))
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(plan.q, dp_accounting.GaussianDpEvent(sigma)),
        plan.steps * strategy_cfg.num_rounds,
    )
    assert accountant.get_epsilon(1e-5) <= 8.0 * 1.01
    ours = epsilon(
        [
            GaussianEvent(sigma=prototype_noise_multiplier(half)),
            SampledGaussianEvent(plan.q, sigma, plan.steps * strategy_cfg.num_rounds),
        ],
        1e-5,
    )
    assert ours <= 8.0 + 1e-9


def test_a_prototype_release_is_the_class_sums_plus_noise_of_the_formula(tmp_path):
    cfg = run_config(*HEAD, "recipe.prototypes=true", "privacy.epsilon=1")
    msg, context, _, data = make_round(tmp_path, cfg, 0, 1.0)
    msg.content.config_records[keys.CONFIG][keys.PHASE] = keys.PHASE_PROTOTYPES
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", 1.0, 1e-5)
    out = train_round(cfg, msg, context)
    released = out.content.array_records[keys.ARRAYS].to_torch_state_dict()[keys.PROTOTYPES]
    exact = class_sums(data.client(0), data.num_classes)
    noise = released.double() - exact
    sigma = prototype_noise_multiplier(cfg)
    assert sigma is not None
    # N(0, sigma^2) per entry: the sample std of K x d draws within 4 standard errors
    n = noise.numel()
    assert abs(float(noise.std()) - sigma) < 4 * sigma / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(n)
    events = Ledger(tmp_path / "ledger.sqlite").events("client-0")
    assert events == [GaussianEvent(sigma=sigma)]  # charged: one Gaussian mechanism
    assert set(out.content.metric_records[keys.METRICS]) <= keys.PUBLIC_REPLY_METRICS


def test_a_prototype_head_is_the_nearest_normalised_class_sum():
    sums = torch.tensor([[3.0, 0.0], [0.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    head = prototype_head(sums, scale=10.0)
    torch.testing.assert_close(
        head["classifier.weight"], torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 0.0]])
    )
    model = LinearHead(2, 3)
    model.load_state_dict({k.removeprefix(""): v for k, v in head.items()})
    assert model(torch.tensor([[0.1, 0.9]])).argmax().item() == 1


@pytest.mark.parametrize("strategy", supporting("prototype_head"))
def test_a_head_from_the_features_carries_over_to_the_adapters_encoder(strategy):
    """The two-stage recipe (prototypes, then adapters: model.pooling=mean): before any adapter
    round the encoder is the frozen one, so the adapters' model gives the head's logits on the
    cached features, for any head."""
    from privfed.models.backbone import forward_logits, load_adapter_state
    from privfed.models.head import head_names
    from privfed.strategies.registry import build_strategy

    cfg = run_config(*TINY, f"strategy={strategy}", "recipe.prototypes=true", "model.pooling=mean")
    data = federated_data(cfg)
    model = build_strategy(cfg).new_model(data)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    weight, bias = head_names(state)
    gen = torch.Generator().manual_seed(3)
    state[weight] = torch.randn(state[weight].shape, generator=gen)
    state[bias] = torch.randn(state[bias].shape, generator=gen)
    load_adapter_state(model, state)
    model.eval()
    rows = data.partitions[0][:8]
    tokens = data.train.subset(rows)
    with torch.no_grad():
        on_tokens = forward_logits(model, tokens.input_ids, tokens.attention_mask)
    head = LinearHead(state[weight].shape[1], data.num_classes)
    head.load_state_dict({"classifier.weight": state[weight], "classifier.bias": state[bias]})
    assert data.train_features is not None
    on_features = head(data.train_features.subset(rows).features)
    torch.testing.assert_close(on_tokens, on_features, atol=1e-4, rtol=1e-4)


def test_per_sample_gradients_of_the_head_equal_per_example_autograd():
    gen = torch.Generator().manual_seed(1)
    head = LinearHead(6, 4)
    with torch.no_grad():
        head.classifier.weight.normal_(generator=gen)
    x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen)
    gsm = wrap_model(head, grad_sample_mode="hooks", batch_first=True, loss_reduction="sum")
    torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for i in range(5):
        ref = LinearHead(6, 4)
        ref.load_state_dict(head.state_dict())
        torch.nn.functional.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(
            head.classifier.weight.grad_sample[i], ref.classifier.weight.grad
        )
    gsm._close()


def test_full_batch_dp_gradient_descent_samples_everyone_every_step(tmp_path):
    cfg = run_config(*HEAD, "train.sampling=full_batch", "train.local_steps=3")
    plan = local_plan(71, cfg.train)
    assert (plan.q, plan.steps) == (1.0, 3)
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 2.0)
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", 1e6, 1e-5)
    out = train_round(cfg, msg, context)
    payload = out.content.array_records[keys.ARRAYS].to_torch_state_dict()
    assert set(payload) == {"classifier.weight", "classifier.bias"}
    assert Ledger(tmp_path / "ledger.sqlite").events("client-0") == [
        SampledGaussianEvent(q=1.0, sigma=2.0, steps=3)
    ]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("recipe.prototypes=true",), "recipe.prototypes: with trains=adapters the model's head"),
        (("recipe.prototypes=true", "model.pooling=mean", "strategy=rqm"),
         "recipe.prototypes: with strategy=fedsvd, ffa_lora, lora "),
        (("model.pooling=mean", "strategy=fed_sb"), "model.pooling: mean is built on peft LoRA"),
        (("recipe=head", "strategy=fedsvd"), "recipe.trains: head trains no LoRA factors"),
        (("recipe=head", "recipe.prototypes=true", "recipe.prototype_share=1"),
         "recipe.prototype_share: 1 spends the whole budget"),
        (("recipe=head", "num_rounds=0"), "num_rounds: must be >= 1"),
        (("recipe=head", "recipe.prototypes=true", "strategy=fedmentor"),
         "recipe.prototypes: with strategy=fedsvd, ffa_lora, lora "),
        (("data.validation_fraction=0.75",), "data.validation_fraction: with test_fraction"),
        (("train.sampling=all",), "train.sampling"),
        (("strategy=fedmentor", "data.validation_fraction=0"),
         "data.validation_fraction: FedMentor's utility signal reads the validation split"),
    ],
)  # fmt: skip
def test_bad_recipes_fail_with_the_key(overrides, match):
    from privfed.cli import prepare  # the config's checks, then the strategy's declared support

    with pytest.raises(ConfigError, match=match):
        prepare(compose_raw(*TINY, *overrides))
