"""Think as the server: it has the run's whole config and every reply. Against the real client
trainer (``train_round``, Opacus, the tiny BERT), nothing it can compute from them predicts or
cancels the randomness a DP release rests on, no private number rides along with a release,
a round is released once even when it runs twice at once, and a device's own budget beats
whatever the server asks for.

The attacks are the ones that broke earlier versions (noise seeded from the config, the same
noise in two runs of a sweep); each is also shown to work when the noise *is* predictable, so a
passing test means the defence holds, not that the attack was never able to succeed.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from privfed import keys
from privfed.client.app import train_round
from privfed.client.release_protocol import PrivacyInvariantError, reply
from privfed.data.federated import federated_data
from privfed.models.backbone import adapter_names, fresh_model
from privfed.privacy.dp_sgd import (
    RoundRandomness,
    config_derived_noise,
    local_plan,
    train_local,
)
from privfed.privacy.ledger import EventKey, Ledger
from privfed.privacy.opacus_streams import step_noise
from privfed.privacy.releases import ReleaseStore
from privfed.randomness import RandomStream

from ..helpers import TINY, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")

# One DP-SGD step over the whole local dataset (q = 1), plain SGD with lr 1: a client's update
# is exactly minus its release divided by n, so the server reads the release off the reply.
ONE_STEP = (
    *TINY,
    "train.optimizer=sgd",
    "train.learning_rate=1.0",
    "train.lr_schedule=constant",
    "train.batch_size=100000",
    "train.local_epochs=1",
)
BUDGET = 1e6  # the run's ledger never refuses here; what is tested is the randomness


def released(tmp_path, cfg, sigma: float, server_round: int = 1):
    """Run client 0's round through ``train_round``; return the release the server reads off
    the reply (clipped sum + noise, per trainable tensor in order), the client's n and the
    reply."""
    msg, context, state, data = make_round(tmp_path, cfg, server_round, sigma)
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", BUDGET, 1e-5)
    out = train_round(cfg, msg, context)
    payload = out.content.array_records[keys.ARRAYS].to_torch_state_dict()
    n = len(data.client(0))
    assert local_plan(n, cfg.train).q == 1.0 and local_plan(n, cfg.train).steps == 1
    release = {name: (state[name] - payload[name]) * n for name in payload}
    return release, n, out


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in tensors.values()]).norm())


def config_noise(cfg, release: dict, sigma: float, server_round: int = 1) -> dict:
    """What a server regenerates from the config: the config-derived stream, drawn in the
    mechanism's order (every trainable tensor, one step)."""
    stream = config_derived_noise(cfg.seed, 0, server_round)
    assert cfg.privacy.max_grad_norm is not None
    noise = step_noise(
        stream, [t.shape for t in release.values()], sigma * cfg.privacy.max_grad_norm
    )
    return dict(zip(release, noise, strict=True))


def legacy_noise(cfg, release: dict, sigma: float, server_round: int = 1) -> dict:
    """What broke privfed before: Opacus' draws from a torch generator seeded with
    ``round_seed(seed, client, round) + 1``, in parameter order."""
    seed = (cfg.seed * 1_000_003 + 0 * 10_007 + server_round) % (2**62)
    gen = torch.Generator().manual_seed(seed + 1)
    assert cfg.privacy.max_grad_norm is not None
    std = sigma * cfg.privacy.max_grad_norm
    return {n: torch.normal(0, std, t.shape, generator=gen) for n, t in release.items()}


def test_regenerating_the_noise_from_the_config_recovers_nothing(tmp_path):
    cfg = run_config(*ONE_STEP)
    sigma = 5.0
    release, n, _ = released(tmp_path, cfg, sigma)
    assert cfg.privacy.max_grad_norm is not None
    C = cfg.privacy.max_grad_norm
    d = sum(t.numel() for t in release.values())
    noise_norm = sigma * C * d**0.5
    assert norm(release) == pytest.approx(noise_norm, rel=0.1)  # the noise is there
    for regenerate in (config_noise, legacy_noise):
        guess = regenerate(cfg, release, sigma)
        recovered = {k: release[k] - guess[k] for k in release}
        # The true clipped sum has norm <= n C, so the recovery error is at least this:
        error_lower = norm(recovered) - n * C
        assert error_lower > 0.9 * noise_norm, regenerate.__name__


def test_the_same_attack_recovers_the_clipped_sum_when_the_noise_is_config_derived():
    """The attack is real: with the noise drawn from the config-derived stream (the mechanism
    as audit.break_mechanism=known_noise runs it), subtracting the regenerated noise gives the
    clipped sum (computed apart, with no noise and the same dropout masks) to float precision."""
    cfg = run_config(*ONE_STEP)
    data = federated_data(cfg)
    local = data.client(0)
    n, sigma = len(local), 5.0

    def release_with(noise_multiplier: float, draws: RoundRandomness) -> dict:
        model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size)
        names = adapter_names(model)
        before = {k: p.detach().clone() for k, p in model.named_parameters() if k in names}
        train_local(model, local, cfg.train, cfg.privacy, noise_multiplier, draws)
        after = dict(model.named_parameters())
        return {k: (before[k] - after[k].detach()) * n for k in names}

    known = RoundRandomness(RandomStream.secret("s"), config_derived_noise(cfg.seed, 0, 1), 7)
    release = release_with(sigma, known)
    clipped_sum = release_with(
        1e-9, RoundRandomness(RandomStream.secret("s"), RandomStream.secret("n"), 7)
    )
    guess = config_noise(cfg, release, sigma)
    error = norm({k: release[k] - guess[k] - clipped_sum[k] for k in release})
    assert error < 1e-4 * norm(release)  # exact, up to float rounding
    assert norm(release) > 10 * norm(clipped_sum)  # while the noise hid it


def test_two_runs_of_one_config_release_differently_and_without_dp_identically(tmp_path):
    cfg = run_config(*ONE_STEP)
    first, _, _ = released(tmp_path / "a", cfg, 2.0)
    second, _, _ = released(tmp_path / "b", cfg, 2.0)
    assert all(not torch.equal(first[k], second[k]) for k in first)
    # Independent noise: the difference has the norm of two draws (shared noise would cancel).
    d = sum(t.numel() for t in first.values())
    assert cfg.privacy.max_grad_norm is not None
    expected = 2.0 * cfg.privacy.max_grad_norm * (2 * d) ** 0.5
    assert norm({k: first[k] - second[k] for k in first}) == pytest.approx(expected, rel=0.1)

    plain = run_config(*ONE_STEP, "privacy=none")
    msgs = [make_round(tmp_path / d, plain, 1, 0.0) for d in ("c", "d")]
    out = [train_round(plain, m, c).content.array_records[keys.ARRAYS] for m, c, _, _ in msgs]
    a, b = (o.to_torch_state_dict() for o in out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # privacy=none stays fully seeded


def test_two_runs_at_different_sigmas_do_not_cancel(tmp_path):
    """With shared noise z, (s2 r1 - s1 r2) / (s2 - s1) of r_i = sum + s_i C z is the sum."""
    cfg = run_config(*ONE_STEP)
    s1, s2 = 2.0, 3.0
    r1, n, _ = released(tmp_path / "a", cfg, s1)
    r2, _, _ = released(tmp_path / "b", cfg, s2)
    combined = {k: (s2 * r1[k] - s1 * r2[k]) / (s2 - s1) for k in r1}
    assert cfg.privacy.max_grad_norm is not None
    C = cfg.privacy.max_grad_norm
    d = sum(t.numel() for t in r1.values())
    independent = C * d**0.5 * s1 * s2 * 2**0.5 / (s2 - s1)  # its norm with fresh noise
    assert norm(combined) - n * C > 0.5 * independent  # a lower bound on the recovery error


def test_rqm_privacy_mode_draws_fresh_levels_and_rounding(tmp_path):
    cfg = run_config(*TINY, "strategy=rqm", "strategy.mode=privacy", "strategy.keep_prob=0.5")
    replies = []
    for d in ("a", "b"):
        msg, context, _, _ = make_round(tmp_path / d, cfg, 1, 1.0)
        Ledger(tmp_path / d / "ledger.sqlite").set_budget("client-0", BUDGET, 1e-5)
        replies.append(train_round(cfg, msg, context).content.array_records[keys.ARRAYS])
    a, b = (r.to_torch_state_dict() for r in replies)
    assert set(a) == set(b) and all(t.dtype == torch.uint8 for t in a.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides,phase",
    [
        ((), None),
        (("strategy=fed_sb",), keys.PHASE_INIT),
        (("strategy=rqm", "strategy.mode=privacy", "strategy.keep_prob=0.5"), None),
        (("strategy=rqm",), None),
    ],
)
def test_a_dp_reply_carries_the_release_and_public_fields_only(tmp_path, overrides, phase):
    cfg = run_config(*TINY, *overrides)
    msg, context, _, _ = make_round(tmp_path, cfg, 0 if phase else 1, 1.0)
    config = msg.content.config_records[keys.CONFIG]
    if phase:
        config[keys.PHASE] = phase
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", BUDGET, 1e-5)
    out = train_round(cfg, msg, context)
    metrics = out.content.metric_records[keys.METRICS]
    assert set(metrics) <= keys.PUBLIC_REPLY_METRICS, set(metrics) - keys.PUBLIC_REPLY_METRICS
    assert metrics[keys.SAT_OUT] == 0 and keys.ARRAYS in out.content.array_records
    assert set(out.content) == {keys.METRICS, keys.ARRAYS}  # no other record of any kind
    assert keys.TRAIN_LOSS not in metrics and keys.TRAIN_TIME not in metrics


def test_secret_keys_come_from_the_os_one_fresh_256_bit_key_per_stream(monkeypatch):
    """The key source itself: a key derived from anything but a fresh OS draw (a counter, a
    hash of the config, 2^20 possible values, one key reused) fails here, even where the
    attacks above could not tell."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    drawn: list[bytes] = []

    def spy(n: int) -> bytes:
        out = real(n)
        drawn.append(out)
        return out

    real = os.urandom
    monkeypatch.setattr(os, "urandom", spy)
    streams = [RandomStream.secret("dp_sgd.noise") for _ in range(3)]
    assert [len(k) for k in drawn] == [32, 32, 32]  # one 256-bit OS draw per stream
    assert len(set(drawn)) == 3
    for key, stream in zip(drawn, streams, strict=True):
        expected = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        assert stream.words(8).tobytes() == expected.update(bytes(64))  # keyed by it, all of it


def test_every_secret_stream_of_a_dp_round_is_keyed_by_its_own_os_draw(tmp_path, monkeypatch):
    drawn: list[bytes] = []
    keys_used: list[bytes] = []
    real_urandom, real_init = os.urandom, RandomStream.__init__

    def spy_urandom(n: int) -> bytes:
        out = real_urandom(n)
        drawn.append(out)
        return out

    def spy_init(self, key: bytes, *, secret: bool, purpose: str) -> None:
        if secret:
            keys_used.append(key)
        real_init(self, key, secret=secret, purpose=purpose)

    monkeypatch.setattr(os, "urandom", spy_urandom)
    monkeypatch.setattr(RandomStream, "__init__", spy_init)
    released(tmp_path, run_config(*ONE_STEP), sigma=1.0)
    assert len(keys_used) >= 2  # at least Poisson sampling and the noise
    assert len(set(keys_used)) == len(keys_used)  # never one key for two streams
    assert all(k in drawn for k in keys_used)  # each an OS draw


def test_a_reply_carries_only_the_tensors_the_strategy_declares(tmp_path, monkeypatch):
    """An extra tensor in the payload (here the private training loss, or a wider adapter) is
    refused on the client, before anything leaves; the server would reject it too."""
    from privfed.strategies.lora import LoraFedAvg

    cfg = run_config(*TINY)
    msg, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", BUDGET, 1e-5)
    honest = LoraFedAvg.client_payload

    def with_the_loss(self, global_state, local_state):
        payload = honest(self, global_state, local_state)
        if global_state is local_state:  # the declaration stays honest
            return payload
        return {**payload, "train_loss": torch.tensor([0.3])}

    monkeypatch.setattr(LoraFedAvg, "client_payload", with_the_loss)
    with pytest.raises(PrivacyInvariantError, match="declared tensors only"):
        train_round(cfg, msg, context)
    declared = LoraFedAvg(cfg).declared_payload(state)
    name = next(iter(declared))
    wider = {**declared, name: torch.zeros(declared[name].shape[0] + 1, *declared[name].shape[1:])}
    for bad in ({**declared, "extra": torch.zeros(1)}, wider):
        with pytest.raises(PrivacyInvariantError, match="declared tensors only"):
            reply(cfg, msg, bad, {keys.SAT_OUT: 0}, declared)
    with pytest.raises(PrivacyInvariantError, match="declared"):
        reply(cfg, msg, declared, {keys.SAT_OUT: 0})  # a payload nobody declared


def test_a_private_number_cannot_be_put_into_a_dp_reply(tmp_path):
    cfg = run_config(*TINY)
    msg, _, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    with pytest.raises(PrivacyInvariantError, match="train-loss"):
        reply(cfg, msg, None, {keys.SAT_OUT: 0, keys.TRAIN_LOSS: 0.3})
    plain = run_config(*TINY, "privacy=none")  # without DP there is nothing to protect
    assert reply(plain, msg, None, {keys.TRAIN_LOSS: 0.3}).content.metric_records


def test_a_round_held_by_another_execution_is_not_trained_again(tmp_path):
    cfg = run_config(*TINY)
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", BUDGET, 1e-5)
    store = ReleaseStore(tmp_path / "releases")
    with store.reservation(EventKey("run", "client-0", 1)) as held:
        assert held  # another execution, in the middle of this round
        busy = train_round(cfg, msg, context)
        with store.reservation(EventKey("run", "client-0", 1)) as again:
            assert not again  # one holder at a time, even within one process
    metrics = busy.content.metric_records[keys.METRICS]
    assert metrics[keys.SAT_OUT] == 1 and metrics[keys.ROUND_IN_PROGRESS] == 1
    assert keys.ARRAYS not in busy.content.array_records and ledger.rows() == []
    first = train_round(cfg, msg, context)  # the holder is gone: the round runs once
    repeat = train_round(cfg, msg, context)  # and a later execution re-sends those bytes
    a, b = (r.content.array_records[keys.ARRAYS].to_torch_state_dict() for r in (first, repeat))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(ledger.rows()) == 1


def test_two_executions_of_one_round_at_once_give_one_release_and_one_charge(tmp_path):
    cfg = run_config(*TINY)
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", BUDGET, 1e-5)
    barrier = threading.Barrier(2)
    replies: list = [None, None]

    def execute(i: int) -> None:
        barrier.wait()
        replies[i] = train_round(cfg, msg, context)

    threads = [threading.Thread(target=execute, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    payloads = [
        r.content.array_records[keys.ARRAYS].to_torch_state_dict()
        for r in replies
        if keys.ARRAYS in r.content.array_records
    ]
    assert payloads  # one of them trained
    for other in payloads[1:]:  # a second reply, if any, is the same release, byte for byte
        assert all(torch.equal(payloads[0][k], other[k]) for k in other)
    assert len(ledger.rows()) == 1
    assert len(list((tmp_path / "releases").rglob("*.pt"))) == 1


def test_a_device_refuses_a_round_its_own_budget_cannot_pay_for(tmp_path, monkeypatch):
    """The server's ledger would allow it (BUDGET); the device's own does not."""
    monkeypatch.setenv("PRIVFED_DEVICE_EPSILON", "2.0")
    monkeypatch.setenv("PRIVFED_DEVICE_LEDGER", str(tmp_path / "device.sqlite"))
    cfg = run_config(*TINY)
    greedy, context, _, _ = make_round(tmp_path / "greedy", cfg, 1, 0.3)  # sigma far too small
    server = Ledger(tmp_path / "greedy" / "ledger.sqlite")
    server.set_budget("client-0", BUDGET, 1e-5)
    out = train_round(cfg, greedy, context)
    metrics = out.content.metric_records[keys.METRICS]
    assert metrics[keys.SAT_OUT] == 1 and metrics[keys.DEVICE_REFUSED] == 1
    assert keys.ARRAYS not in out.content.array_records
    assert not list((tmp_path / "greedy" / "releases").rglob("*.pt"))  # nothing trained
    device = Ledger(tmp_path / "device.sqlite")
    assert device.rows() == [] and server.rows() == []
    assert device.budget("client-0") == (2.0, 1e-5)

    fair, context, _, _ = make_round(tmp_path / "fair", cfg, 1, 5.0)  # fits epsilon = 2
    Ledger(tmp_path / "fair" / "ledger.sqlite").set_budget("client-0", BUDGET, 1e-5)
    out = train_round(cfg, fair, context)
    assert out.content.metric_records[keys.METRICS][keys.SAT_OUT] == 0
    assert [r[3:] for r in device.rows()] == [
        r[3:] for r in Ledger(tmp_path / "fair" / "ledger.sqlite").rows()
    ]  # the device recorded the very event the run's accountant did
    assert 0 < device.spent("client-0") <= 2.0


@pytest.mark.parametrize(
    "overrides",
    [
        ("privacy=none",),
        ("audit.enabled=true", "audit.break_mechanism=no_noise"),
        # central user-level DP alone: the update would reach the server in the clear
        ("privacy=user", "privacy.user.epsilon=8"),
    ],
)
def test_a_device_refuses_a_run_that_is_not_private(tmp_path, monkeypatch, overrides):
    monkeypatch.setenv("PRIVFED_DEVICE_EPSILON", "100")
    monkeypatch.setenv("PRIVFED_DEVICE_LEDGER", str(tmp_path / "device.sqlite"))
    cfg = run_config(*TINY, *overrides, "audit.canaries=20")
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    out = train_round(cfg, msg, context)
    metrics = out.content.metric_records[keys.METRICS]
    assert metrics[keys.SAT_OUT] == 1 and metrics[keys.DEVICE_REFUSED] == 1
    assert keys.ARRAYS not in out.content.array_records
