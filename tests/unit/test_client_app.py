"""The ClientApp's round, called directly (no Ray): budget enforcement and what leaves a client."""

from __future__ import annotations

import pytest
import torch

from privfed import keys
from privfed.client.app import train_round
from privfed.privacy.accountant import epsilon
from privfed.privacy.dp_sgd import local_plan
from privfed.privacy.events import SampledGaussianEvent
from privfed.privacy.ledger import EventKey, Ledger

from ..helpers import TINY, free_port, make_round, run_config

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_a_round_is_recorded_before_the_reply_and_only_the_payload_leaves(tmp_path):
    cfg = run_config(*TINY, "train.batch_size=16")
    sigma = 1.0
    msg, context, state, data = make_round(tmp_path, cfg, 1, sigma)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", 100.0, 1e-5)
    reply = train_round(cfg, msg, context)
    payload = reply.content.array_records[keys.ARRAYS].to_torch_state_dict()
    assert set(payload) == set(state)  # lora: every adapter tensor, nothing else
    assert any(not torch.equal(payload[n], state[n]) for n in state)
    plan = local_plan(len(data.client(0)), cfg.train)
    rows = ledger.rows()
    assert [r[:4] for r in rows] == [("run", "client-0", 1, "dp_sgd")]
    assert ledger.events("client-0") == [SampledGaussianEvent(plan.q, sigma, plan.steps)]
    metrics = reply.content.metric_records[keys.METRICS]
    assert metrics[keys.EPSILON_SPENT] == pytest.approx(
        epsilon([SampledGaussianEvent(plan.q, sigma, plan.steps)], 1e-5)
    )
    # The same round again (a resumed run): the stored release, bit for bit, charged once.
    again = train_round(cfg, msg, context).content.array_records[keys.ARRAYS].to_torch_state_dict()
    assert len(ledger.rows()) == 1
    for n in payload:
        assert torch.equal(again[n], payload[n])


def test_a_charged_round_whose_release_is_lost_is_not_released_again(tmp_path):
    cfg = run_config(*TINY, "train.batch_size=16")
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", 100.0, 1e-5)
    train_round(cfg, msg, context)
    for f in (tmp_path / "releases").rglob("*.pt"):
        f.unlink()
    reply = train_round(cfg, msg, context)
    assert keys.ARRAYS not in reply.content.array_records
    assert reply.content.metric_records[keys.METRICS][keys.SAT_OUT] == 1
    assert len(ledger.rows()) == 1


def test_a_client_without_budget_left_sits_out_and_spends_nothing(tmp_path):
    cfg = run_config(*TINY)
    msg, context, _, data = make_round(tmp_path, cfg, 3, 1.0)
    plan = local_plan(len(data.client(0)), cfg.train)
    spent_two = epsilon([SampledGaussianEvent(plan.q, 1.0, plan.steps * 2)], 1e-5)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.set_budget("client-0", spent_two * 1.01, 1e-5)  # two rounds fit, a third does not
    for r in (1, 2):
        ledger.report(EventKey("run", "client-0", r), SampledGaussianEvent(plan.q, 1.0, plan.steps))
    reply = train_round(cfg, msg, context)
    assert keys.ARRAYS not in reply.content.array_records
    assert reply.content.metric_records[keys.METRICS][keys.SAT_OUT] == 1
    assert len(ledger.rows()) == 2


def test_release_store_keeps_only_the_latest_round(tmp_path):
    from privfed.privacy.releases import ReleaseStore

    store = ReleaseStore(tmp_path)
    for r in (1, 2, 3):
        store.save(EventKey("run", "client-0", r), {"payload": {"x": torch.full((2,), float(r))}})
    assert store.load(EventKey("run", "client-0", 1)) is None
    assert store.load(EventKey("run", "client-0", 2)) is None
    assert torch.equal(
        store.load(EventKey("run", "client-0", 3))["payload"]["x"], torch.full((2,), 3.0)
    )


def test_an_unreachable_accountant_service_means_no_training_and_no_release(tmp_path, monkeypatch):
    port = free_port()  # nobody listens on it
    monkeypatch.setenv("PRIVFED_ACCOUNTANT_TOKEN", "token")
    cfg = run_config(
        *TINY,
        "privacy.accountant.backend=http",
        f"privacy.accountant.url=http://127.0.0.1:{port}",
        "privacy.accountant.retry_for_s=0.5",
        "privacy.accountant.timeout_s=0.5",
    )
    msg, context, _, _ = make_round(tmp_path, cfg, 1, 1.0)
    reply = train_round(cfg, msg, context)
    metrics = reply.content.metric_records[keys.METRICS]
    assert metrics[keys.SAT_OUT] == 1 and metrics[keys.ACCOUNTANT_UNREACHABLE] == 1
    assert keys.ARRAYS not in reply.content.array_records  # nothing leaves the client
    assert not list((tmp_path / "releases").rglob("*.pt"))  # nothing was trained or stored
