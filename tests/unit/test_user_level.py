"""User-level DP (DP-FedAvg, privacy/user_level.py): clipping and noise against their formulas,
on the pure functions and on real client replies through the strategy; epsilon against Google's
dp-accounting; and the attacks that would break it (a predictable sample or noise, per-device
figures in the outputs, an update over C from a device that should have clipped)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch

from privfed.config import ConfigError
from privfed.privacy import user_level
from privfed.privacy.calibration import user_noise_multiplier
from privfed.randomness import RandomStream
from privfed.strategies.registry import build_strategy, supporting
from privfed.strategies.replies import RoundOutcome
from privfed.strategies.user_level_dp import UserLevelDP
from tests.helpers import TINY, compose_raw, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")

USER = ("privacy=user", "federation.clients_per_round=2")


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[n].double().flatten() for n in sorted(state)])


def test_clip_scales_the_whole_update_by_one_factor():
    rng = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(30, 4, generator=rng), "b": torch.randn(7, generator=rng)}
    norm = float(_flat(update).norm())
    clipped = user_level.clip(update, norm / 10)
    assert float(_flat(clipped).norm()) == pytest.approx(norm / 10, rel=1e-12)
    for n in update:  # the same direction: one factor for every tensor, not per tensor
        assert torch.allclose(clipped[n], update[n].double() / 10, rtol=1e-12)
    small = user_level.clip(update, norm * 2)
    assert all(torch.equal(small[n], update[n].double()) for n in update)


def test_the_release_is_the_clipped_sum_over_the_expected_devices_plus_gaussian_noise():
    rng = torch.Generator().manual_seed(1)
    reference = {"w": torch.randn(400, 50, generator=rng), "h": torch.randn(5, generator=rng)}
    updates = [{n: torch.randn(t.shape, generator=rng) * s for n, t in reference.items()}
               for s in (0.01, 1.0, 5.0)]  # fmt: skip
    clip_norm, expected = 2.0, 7.5
    # sigma 0: exactly the fixed-denominator mean of the clipped updates (computed here alone)
    exact = (
        _flat(reference)
        + sum(_flat(u) * min(1.0, clip_norm / float(_flat(u).norm())) for u in updates) / expected
    )
    got = user_level.noised_mean(
        reference, updates, clip_norm, 0.0, expected, RandomStream.secret("test")
    )
    assert torch.allclose(_flat(got), exact.float().double(), atol=1e-6)
    # sigma 1.3: the residual is N(0, (sigma C / expected)^2) per coordinate
    sigma = 1.3
    noisy = user_level.noised_mean(
        reference, updates, clip_norm, sigma, expected, RandomStream.secret("test")
    )
    residual = (_flat(noisy) - exact).numpy()
    want = sigma * clip_norm / expected
    n = residual.size  # 20,005: the sample std is within 5 of its standard errors
    assert abs(residual.std() / want - 1) < 5 / math.sqrt(2 * n)
    assert abs(residual.mean()) < 5 * want / math.sqrt(n)
    # a server learning rate eta scales the released mean update (noise included)
    eta = 2.5
    stepped = user_level.noised_mean(
        reference, updates, clip_norm, sigma, expected, RandomStream.secret("test"), eta
    )
    step = (_flat(stepped) - _flat(reference)).numpy()
    mean_update = (exact - _flat(reference)).numpy()
    residual = step - eta * mean_update
    assert abs(residual.std() / (eta * want) - 1) < 5 / math.sqrt(2 * n)


def test_poisson_sampling_includes_each_node_at_the_rate_and_is_never_the_same_twice():
    nodes = list(range(2000))
    rate = 0.1
    counts = np.zeros(len(nodes))
    draws = [user_level.poisson_sample(nodes, rate, RandomStream.secret("s")) for _ in range(50)]
    for picked in draws:
        counts[picked] += 1
    total = counts.sum()  # Binomial(100,000, 0.1): sd ~95
    assert abs(total - rate * len(nodes) * 50) < 5 * math.sqrt(len(nodes) * 50 * rate * (1 - rate))
    assert len({tuple(p) for p in draws}) == len(draws)  # fresh per round


def test_user_level_sigma_meets_epsilon_by_dp_accounting():
    cfg = run_config(
        *TINY, "privacy=user", "privacy.user.epsilon=3", "federation.num_clients=10",
        "federation.clients_per_round=1", "num_rounds=20",
    )  # fmt: skip
    sigma = user_noise_multiplier(cfg)
    assert sigma is not None
    accountant = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, 20)
    theirs = accountant.get_epsilon(1e-5)
    assert theirs <= 3.0 * (1 + 1e-3)
    # and not much more noise than needed: 1% less noise would overspend
    accountant = dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(sigma / 1.01))
    accountant.compose(event, 20)
    assert accountant.get_epsilon(1e-5) > 3.0


def test_a_given_user_sigma_that_overspends_fails_before_start():
    from privfed.cli import prepare

    raw = compose_raw(*TINY, *USER, "privacy.user.epsilon=1", "privacy.user.noise_multiplier=0.3")
    with pytest.raises(ConfigError, match="privacy.user.noise_multiplier"):
        prepare(raw)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("strategy=rqm",), "privacy.unit: user-level DP supports .* not rqm: its payload"),
        (("strategy=fedmentor",), "not fedmentor: its domain-aware noise"),
        (("strategy=fed_sb",), "use strategy.init=random"),
        (("privacy.user.epsilon=null",), "privacy.user.epsilon: required"),
        (("privacy.user.noise_multiplier=0", "privacy.user.adaptive=true"),
         "privacy.user.adaptive: its count is noised inside sigma"),
        (("privacy.user.server_learning_rate=0",), "privacy.user.server_learning_rate"),
        (("privacy.user.clip_norm=0",), "privacy.user.clip_norm"),
        (("privacy.user.clipping=device",), "privacy.user.clipping"),
        (("audit.enabled=true", "audit.break_mechanism=no_clipping"),
         "audit.break_mechanism: a user-level audit can break no_noise only"),
        (("privacy=dp_sgd", "privacy.unit=user", "privacy.user.epsilon=3",
          "privacy.accountant.backend=http", "privacy.accountant.url=http://127.0.0.1:1"),
         "privacy.accountant.backend: with unit=user each device keeps its record-level"),
    ],
)  # fmt: skip
def test_bad_user_level_settings_fail_with_the_key(overrides, match):
    from privfed.cli import prepare  # the config's checks, then the strategy's declared support

    with pytest.raises(ConfigError, match=match):
        prepare(compose_raw(*TINY, *USER, *overrides))


# -- on real replies through the strategy -------------------------------------------------------
def _replies(tmp_path, cfg, partitions=(0, 1, 2)):
    """Real replies: each partition trains one round through the client app (non-private
    DP-SGD off: user-level alone), from the same broadcast."""
    from privfed import keys
    from privfed.client.app import train_round

    replies, state = [], None
    for pid in partitions:
        msg, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
        context.node_config[keys.NODE_PARTITION_ID] = pid
        replies.append(train_round(cfg, msg, context))
    return replies, state


def _strategy(cfg, state):
    strategy = build_strategy(cfg)
    strategy.global_state = dict(state)
    return strategy


def _aggregate(strategy, replies):
    """(the released state, the round's outcome) of a round where 3 devices were sampled."""
    return strategy.aggregate_round(1, replies, RoundOutcome(sampled=3))


def test_the_server_clips_and_noises_real_replies_by_the_formula(tmp_path):
    from privfed import keys

    clip_norm, sigma = 0.01, 2.0
    cfg = run_config(
        *TINY, *USER, "privacy.user.epsilon=1000", f"privacy.user.noise_multiplier={sigma}",
        f"privacy.user.clip_norm={clip_norm}",
    )  # fmt: skip
    replies, state = _replies(tmp_path, cfg)
    payloads = [r.content.array_records[keys.ARRAYS].to_torch_state_dict() for r in replies]
    updates = [_flat(p) - _flat({n: state[n] for n in p}) for p in payloads]
    norms = [float(u.norm()) for u in updates]
    assert min(norms) > 5 * clip_norm  # real updates, well over C: the clipping matters
    expected_devices = 2 / 3 * 3
    exact = _flat(state) + sum(u * clip_norm / n for u, n in zip(updates, norms, strict=True)) / 2
    residuals = []
    for _ in range(20):  # fresh noise each time
        new, _ = _aggregate(_strategy(cfg, state), replies)
        assert new is not None
        residuals.append((_flat(new) - exact).numpy())
    residual = np.concatenate(residuals)
    want = sigma * clip_norm / expected_devices
    assert abs(residual.std() / want - 1) < 5 / math.sqrt(2 * residual.size)
    assert abs(residual.mean()) < 5 * want / math.sqrt(residual.size)
    assert not np.allclose(residuals[0], residuals[1])  # never the same noise twice


def test_client_clipping_clips_on_the_device_and_the_server_rejects_an_update_over_c(tmp_path):
    from privfed import keys

    common = (*TINY, *USER, "privacy.user.clip_norm=0.01")
    device_clips = run_config(*common, "privacy.user.clipping=client")
    (reply,), state = _replies(tmp_path, device_clips, partitions=(0,))
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    norm = float((_flat(payload) - _flat({n: state[n] for n in payload})).norm())
    assert norm == pytest.approx(0.01, rel=1e-3)  # the device clipped its own update
    strategy = _strategy(device_clips, state)
    new, out = _aggregate(strategy, [reply])
    assert new is not None and out.rejected == 0
    # a device that did not clip (here: trained under server clipping) is rejected and counted
    (unclipped,), _ = _replies(tmp_path / "b", run_config(*common), partitions=(0,))
    strategy = _strategy(device_clips, state)
    new, out = _aggregate(strategy, [unclipped])
    assert out.rejected == 1 and out.trained == 0
    assert "exceeds privacy.user.clip_norm" in out.rejections[0]
    assert new is not None  # the round is still released (noise only): see the next test


@pytest.mark.parametrize("name", supporting("user_level"))
def test_a_round_nobody_answered_is_still_a_noised_release(tmp_path, name):
    """An unchanged model would tell everyone that no device was sampled or answered. The same
    DP-FedAvg (strategies/user_level_dp.py) releases around every strategy that supports it."""
    extra = ("strategy.init=random",) if name == "fed_sb" else ()
    cfg = run_config(*TINY, *USER, f"strategy={name}", *extra)
    _, _, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    strategy = _strategy(cfg, state)
    assert isinstance(strategy.user_dp, UserLevelDP)
    new, out = _aggregate(strategy, [])
    assert new is not None and out.extra == {}
    assert not torch.equal(_flat(new), _flat(state))


def test_nothing_per_device_is_reported_under_user_level_dp(tmp_path):
    from privfed import keys

    cfg = run_config(*TINY, *USER)
    replies, state = _replies(tmp_path, cfg, partitions=(0,))
    metrics = replies[0].content.metric_records[keys.METRICS]
    assert keys.TRAIN_LOSS not in metrics and keys.TRAIN_TIME not in metrics
    strategy = _strategy(cfg, state)
    _, out = _aggregate(strategy, replies)
    assert out.extra == {}  # e.g. no aggregation_error of the un-noised updates


def test_a_device_accounts_its_record_level_dp_in_its_own_storage_under_user_level(tmp_path):
    """privacy=dp_sgd with unit=user: the run's ledger (the server's) is not told of the round;
    the device's own ledger, in its own storage, holds it with the run's per-device budget."""
    from privfed import keys
    from privfed.client.app import train_round
    from privfed.privacy.ledger import Ledger

    cfg = run_config(*TINY, "privacy=dp_sgd", "privacy.unit=user", "privacy.user.epsilon=3")
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    out = train_round(cfg, msg, context)
    assert out.content.metric_records[keys.METRICS][keys.SAT_OUT] == 0
    assert (
        not (tmp_path / "ledger.sqlite").exists() or Ledger(tmp_path / "ledger.sqlite").rows() == []
    )
    device = Ledger(tmp_path / "client-0" / "device-ledger.sqlite")
    assert device.budget("client-0") == (8.0, 1e-5) and len(device.events("client-0")) == 1


def test_a_clip_only_control_adds_no_noise_and_claims_no_guarantee():
    from privfed.privacy.calibration import user_noise_multiplier

    cfg = run_config(*TINY, *USER, "privacy.user.noise_multiplier=0", "privacy.user.epsilon=null")
    assert cfg.privacy.user.clip_only and user_noise_multiplier(cfg) == 0.0


def test_the_sample_is_secret_not_a_function_of_the_config():
    cfg = run_config(*TINY, *USER, "federation.num_clients=3")
    nodes = list(range(1000))
    a = build_strategy(cfg).sample_nodes(1, nodes)
    b = build_strategy(cfg).sample_nodes(1, nodes)
    assert a != b  # the same config, seed and round: another sample


# -- adaptive clipping (Andrew et al. 2021) -----------------------------------------------------
def test_the_update_and_count_noise_make_up_the_rounds_sigma():
    sigma, count_std = 1.1, 3.0
    sigma_u = user_level.update_noise_multiplier(sigma, count_std)
    assert sigma_u > sigma  # the update gets more noise: the count takes part of the budget
    assert (sigma_u**-2 + (2 * count_std) ** -2) ** -0.5 == pytest.approx(sigma, rel=1e-12)
    with pytest.raises(ValueError, match="count_noise_std"):
        user_level.update_noise_multiplier(sigma, sigma / 2)  # 2 sigma_b = sigma: nothing left


def test_the_noised_fraction_is_the_centred_count_over_the_expected_devices():
    norms = [0.1, 0.2, 0.3, 5.0, 6.0]
    exact = user_level.noised_fraction_within(norms, 1.0, 0.0, 5.0, RandomStream.secret("t"))
    assert exact == pytest.approx(3 / 5)
    assert user_level.noised_fraction_within(
        norms, 1.0, 0.0, 10.0, RandomStream.secret("t")
    ) == pytest.approx(0.5 + (3 - 2.5) / 10)  # fixed denominator: not the count of replies
    draws = np.array(
        [user_level.noised_fraction_within(norms, 1.0, 2.0, 5.0, RandomStream.secret("t"))
         for _ in range(4000)]
    )  # fmt: skip
    assert abs(draws.std() / (2.0 / 5.0) - 1) < 5 / math.sqrt(2 * draws.size)


def test_adaptive_clipping_finds_the_target_quantile_of_the_norms():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(0.0, 0.5, size=400)  # median 1.0
    for target in (0.5, 0.9):
        clip_norm = 0.05
        for _ in range(300):
            within = user_level.noised_fraction_within(
                norms, clip_norm, 2.0, len(norms), RandomStream.secret("t")
            )
            clip_norm = user_level.next_clip_norm(clip_norm, within, target, 0.2)
        assert np.mean(norms <= clip_norm) == pytest.approx(target, abs=0.05)


def test_adaptive_clipping_moves_c_on_real_replies_and_checks_its_noise_before_start(tmp_path):
    from privfed.cli import prepare

    adaptive = (*TINY, *USER, "privacy.user.adaptive=true", "privacy.user.epsilon=1000")
    tiny_c = run_config(*adaptive, "privacy.user.clip_norm=1e-6")
    replies, state = _replies(tmp_path, tiny_c)
    strategy = _strategy(tiny_c, state)
    _aggregate(strategy, replies)
    assert strategy.user_dp.clip_norm > 1e-6  # every update is over C: C grows
    huge_c = run_config(*adaptive, "privacy.user.clip_norm=1e6")
    strategy = _strategy(huge_c, state)
    _, out = _aggregate(strategy, replies)
    assert strategy.user_dp.clip_norm < 1e6  # every update fits: C shrinks
    assert "user_fraction_within_clip" in out.extra
    with pytest.raises(ConfigError, match="privacy.user.count_noise_std"):
        prepare(compose_raw(*adaptive, "privacy.user.count_noise_std=0.01"))
    with pytest.raises(ConfigError, match="privacy.user.adaptive: with clipping=server"):
        run_config(*adaptive, "privacy.user.clipping=client")
