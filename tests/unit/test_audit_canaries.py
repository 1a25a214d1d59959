"""Gradient canaries: where they go, and that DP-SGD clips and noises them like any example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privfed.audit.canaries import CanaryGradients, CanaryPlan, audited_data
from privfed.audit.faults import mechanism_fault
from privfed.config import AuditConfig
from privfed.data.federated import federated_data
from privfed.models.backbone import adapter_names, fresh_model, set_trainable
from privfed.privacy.dp_sgd import RoundRandomness, train_local
from tests.helpers import ONE_SGD_STEP, TINY, dp_privacy, run_config


def audit_config(**changes) -> AuditConfig:
    """An audit as conf/ gives it (the only source of defaults), enabled, with ``changes``."""
    return AuditConfig.model_validate(
        {**run_config(*TINY).audit.model_dump(), "enabled": True, **changes}
    )


def test_plan_spreads_canaries_over_clients_and_draws_distinct_coordinates():
    plan = CanaryPlan(audit_config(canaries=1001, seed=3), num_clients=4)
    owned = np.concatenate([plan.owned_by(c) for c in range(4)])
    assert sorted(owned) == list(range(1001))
    assert 0.45 < plan.included.mean() < 0.55
    assert all(set(plan.included_in(c)) <= set(plan.owned_by(c)) for c in range(4))
    tensor, offset = plan.coordinates([10, 2000, 7])
    assert len({(t, o) for t, o in zip(tensor, offset, strict=True)}) == 1001
    assert all(o < (10, 2000, 7)[t] for t, o in zip(tensor, offset, strict=True))
    with pytest.raises(ValueError, match="audit.canaries"):
        plan.coordinates([500, 500])


def test_audit_data_counts_canaries_as_records():
    cfg = run_config(*TINY, "audit.enabled=true", "audit.canaries=30")
    data = audited_data(cfg)
    plan = data.extra
    assert isinstance(plan, CanaryPlan)
    assert federated_data(cfg).extra is None  # the data layer adds nothing by itself
    for c in range(3):
        local = data.client(c)
        assert len(local) == len(data.client_examples(c)) + len(plan.included_in(c))
        assert data.sizes()[c] == len(local)
        canary_labels = local.labels[local.labels < 0]
        assert sorted((-canary_labels - 1).tolist()) == sorted(plan.included_in(c).tolist())


@pytest.fixture(scope="module")
def tiny():
    cfg = run_config(*TINY, "audit.enabled=true", "audit.canaries=30")
    data = audited_data(cfg)
    model = fresh_model(cfg.model, data.num_classes, cfg.seed, data.vocab_size)
    set_trainable(model, adapter_names(model), lambda name: True)
    return cfg, data, model


@pytest.mark.parametrize(
    "clipping,broken", [("flat", "none"), ("per_layer", "none"), ("flat", "no_clipping")]
)
def test_a_canary_step_moves_its_coordinate_by_the_clipped_gradient(tiny, clipping, broken):
    """One canary alone, q = 1, one SGD step with lr 1 and (almost) no noise: the update is
    -clip(scale * C) at the canary's coordinate and nothing elsewhere."""
    cfg, data, model = tiny
    plan = data.extra
    canary = int(plan.included_in(0)[0])
    only = data.client(0)
    only = only.subset(np.flatnonzero(only.labels.numpy() == -1 - canary))
    C, scale = 0.5, 10.0
    train = ONE_SGD_STEP
    privacy = dp_privacy(epsilon=1.0, delta=1e-5, max_grad_norm=C, clipping=clipping)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    canaries = CanaryGradients(plan, params, scale * C)
    result = train_local(
        model,
        only,
        train,
        privacy,
        1e-9,
        RoundRandomness.secret(),
        supplied=canaries,
        fault=mechanism_fault(broken),
    )
    assert result.steps == 1 and result.event is not None and result.event.sigma == 1e-9
    update = torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start, strict=True)])
    k, offset = int(canaries.tensor[canary]), int(canaries.offset[canary])
    index = sum(p.numel() for p in params[:k]) + offset
    if broken == "no_clipping":
        expected = scale * C
    elif clipping == "flat":
        expected = C
    else:  # per-layer: the bound of the canary's own tensor
        expected = C / len(params) ** 0.5
    assert float(-update[index]) == pytest.approx(expected, rel=1e-4)
    update[index] = 0.0
    assert float(update.abs().max()) < 1e-6 * C
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
