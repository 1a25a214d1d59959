"""A worker builds the model once (client/local_model.py): what one client call leaves behind,
and that a call's release is what a freshly built model would release."""

from __future__ import annotations

import threading

import pytest
import torch
from flwr.app import ArrayRecord

from privfed import keys
from privfed.client import app, local_model
from privfed.client.local_model import local_model as checkout
from privfed.models.backbone import forward_inputs
from privfed.privacy.dp_sgd import RoundRandomness
from privfed.privacy.ledger import Ledger
from privfed.strategies.registry import build_strategy

from ..helpers import TINY, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(autouse=True)
def _empty_pool():
    local_model.clear()
    yield
    local_model.clear()


def _known_streams(monkeypatch) -> None:
    """A fake for this test only: the round's secret streams replaced by seeded ones (keyed by
    client and round), so two executions of a round can be compared bit for bit."""

    def known(private: bool, seed: int, client: int, server_round: int) -> RoundRandomness:
        return RoundRandomness.public(1234, client, server_round)

    monkeypatch.setattr(app, "round_randomness", known)


def _release(tmp_path, cfg, partition_id: int, state_shift: float) -> dict[str, torch.Tensor]:
    """One client's DP round through the ClientApp, on a broadcast state of its own."""
    msg, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    shifted = {n: t + state_shift * torch.randn_like(t) for n, t in state.items()}
    msg.content[keys.ARRAYS] = ArrayRecord(shifted)
    context.node_config[keys.NODE_PARTITION_ID] = partition_id
    reply = app.train_round(cfg, msg, context)
    assert reply.content.metric_records[keys.METRICS][keys.SAT_OUT] == 0
    return reply.content.array_records[keys.ARRAYS].to_torch_state_dict()


@pytest.mark.parametrize(
    "extra,first",
    [
        (("train.optimizer=adam",), ()),
        (("privacy.clipping=per_layer",), ()),
        (("privacy.grad_sample_mode=ghost",), ()),
        # FFA-LoRA trains B only: after a LoRA client, another trainable set on the same model
        (("strategy=ffa_lora",), ("strategy=lora",)),
    ],
)
def test_a_release_from_the_kept_model_is_that_of_a_fresh_model(
    tmp_path, monkeypatch, extra, first
):
    _known_streams(monkeypatch)
    overrides = (*TINY, "train.batch_size=16", "train.local_steps=3", *extra)
    kept_cfg = run_config(*overrides)
    first_cfg = run_config(*overrides, *first)
    fresh_cfg = run_config(*overrides, "federation.reuse_client_model=false")
    for folder in ("kept", "fresh"):
        (tmp_path / folder).mkdir()
        ledger = Ledger(tmp_path / folder / "ledger.sqlite")
        for client in ("client-0", "client-1", "client-2"):
            ledger.set_budget(client, 100.0, 1e-5)
    torch.manual_seed(0)
    before = _release(tmp_path / "kept", first_cfg, 1, 0.5)  # another client first, same model
    torch.manual_seed(1)
    kept = _release(tmp_path / "kept", kept_cfg, 2, 0.1)
    assert len(local_model._POOL) == 1
    torch.manual_seed(1)
    fresh = _release(tmp_path / "fresh", fresh_cfg, 2, 0.1)
    assert set(kept) == set(fresh)
    for name in kept:
        assert torch.equal(kept[name], fresh[name]), name
    assert any(not torch.equal(before[n], kept[n]) for n in kept if n in before)


def test_a_call_leaves_nothing_of_its_client_in_the_worker(tmp_path, monkeypatch):
    cfg = run_config(*TINY, "train.batch_size=16", "train.local_steps=2")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-1", 100.0, 1e-5)
    _release(tmp_path, cfg, 1, 0.5)
    (worker,) = local_model._POOL.values()
    for name, param in worker.params.items():
        assert torch.equal(param.detach(), worker.built[name]), name  # not the client's state
        assert param.grad is None
        assert getattr(param, "grad_sample", None) is None
        assert not hasattr(param, "summed_grad")
    for module in worker.model.modules():
        assert not getattr(module, "activations", None)  # nothing its data made the model hold
    assert worker._hooks is not None and not worker._hooks.hooks_enabled


def test_an_error_mid_training_discards_the_model(tmp_path):
    cfg = run_config(*TINY)
    strategy = build_strategy(cfg)
    _, _, state, data = make_round(tmp_path, cfg, 1, 1.0)
    with checkout(cfg, strategy, state) as worker:
        first = worker
    with pytest.raises(RuntimeError, match="interrupted"):
        with checkout(cfg, strategy, state) as worker:
            assert worker is first
            hooks = worker.hooks("hooks", 1.0)
            inputs = data.client(0).tensor_dataset()[:2]
            forward_inputs(hooks, tuple(inputs[:-1]))  # activations stored, no backward
            raise RuntimeError("interrupted")
    assert not local_model._POOL
    with checkout(cfg, strategy, state) as worker:
        assert worker is not first


def test_a_checkout_while_the_model_is_in_use_gets_its_own(tmp_path):
    cfg = run_config(*TINY)
    strategy = build_strategy(cfg)
    _, _, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    inside, release = threading.Event(), threading.Event()
    seen = []

    def hold() -> None:
        with checkout(cfg, strategy, state) as worker:
            seen.append(worker)
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(30)
    with checkout(cfg, strategy, state) as other:
        assert other is not seen[0]
    release.set()
    thread.join(30)
    assert list(local_model._POOL.values()) == seen  # the one built for the thread stays
