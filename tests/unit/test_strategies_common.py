"""What every strategy must do on a real client: only the tensors it trains change (everything
frozen is bit-identical after DP-SGD), and the reply holds exactly what travels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from privfed import keys
from privfed.client.app import train_round
from privfed.strategies.registry import STRATEGIES, build_strategy

from ..helpers import TINY, compose_raw, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")

# Every registered strategy runs these checks; a strategy needs an entry only for extra overrides
# (Fed-SB: a data-free init, so that its init exchange is not part of a training round).
OVERRIDES = {"fed_sb": ("strategy.init=random",)}
CASES = {name: OVERRIDES.get(name, ()) for name in STRATEGIES}


def test_every_registered_strategy_is_found():
    conf = Path(__file__).resolve().parents[2] / "privfed" / "conf" / "strategy"
    assert set(STRATEGIES) == {p.stem for p in conf.glob("*.yaml")}
    assert {"lora", "ffa_lora", "fedsvd", "fed_sb", "fedmentor", "rqm"} <= set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_frozen_tensors_stay_bit_identical_through_local_dp_sgd(name):
    from privfed.data.federated import federated_data
    from privfed.models.backbone import adapter_names, fresh_model, set_trainable
    from privfed.privacy.dp_sgd import RoundRandomness, train_local

    cfg = run_config(*TINY, f"strategy={name}", *CASES[name], "train.batch_size=16")
    strategy = build_strategy(cfg)
    data = federated_data(cfg)
    model = fresh_model(
        strategy.model_config, data.num_classes, cfg.seed, data.vocab_size, strategy.adapter
    )
    names = adapter_names(model)
    set_trainable(model, names, strategy.trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(model, data.client(0), cfg.train, cfg.privacy, 1.0, RoundRandomness.secret())
    trained = {n for n in names if strategy.trainable(n)}
    assert trained and trained != set(before)
    for n, p in model.named_parameters():
        if n not in trained:
            assert torch.equal(p, before[n]), f"{name}: frozen {n} changed"
    assert any(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in trained)


@pytest.mark.parametrize("name", sorted(set(CASES) - {"rqm"}))  # rqm: see test_rqm.py
def test_the_reply_holds_exactly_the_trained_tensors(tmp_path, name):
    from privfed.privacy.ledger import Ledger

    cfg = run_config(*TINY, f"strategy={name}", *CASES[name], "train.batch_size=16")
    strategy = build_strategy(cfg)
    msg, context, state, _ = make_round(tmp_path, cfg, 1, 1.0)
    if name == "fedmentor":  # its round config holds the domain sigmas of the run's plan
        from privfed.server.prepared import prepare_run

        strategy = prepare_run(cfg).strategy
        msg.content.config_records[keys.CONFIG].update(strategy.round_config(1, 0))
    Ledger(tmp_path / "ledger.sqlite").set_budget("client-0", 100.0, 1e-5)
    reply = train_round(cfg, msg, context)
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    assert set(payload) == {n for n in state if strategy.trainable(n)}
    assert set(reply.content.array_records) == {keys.ARRAYS}


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("model.lora.r=0",), "model.lora.r"),
        # Fed-SB's own rank, or the model's where it sets none: too large for a 64-wide layer
        (("strategy=fed_sb", "strategy.rank=65"), "strategy.rank"),
        (("strategy=fed_sb", "strategy.rank=null", "model.lora.r=4096"), "model.lora.r"),
        (("strategy=fed_sb", "strategy.rank=0"), "strategy.rank"),
    ],
)
def test_bad_rank_fails_before_start(overrides, key):
    from privfed.cli import prepare
    from privfed.config import ConfigError

    with pytest.raises(ConfigError, match=key):
        prepare(compose_raw(*TINY, *overrides))
