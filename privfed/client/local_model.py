"""The model a client trains in a round: a fresh backbone with the broadcast adapter state."""

from __future__ import annotations

import torch

from privfed.config import RunConfig
from privfed.data.federated import federated_data
from privfed.models.backbone import adapter_names, load_adapter_state, set_trainable
from privfed.strategies.base import AdapterStrategy


def global_model(
    cfg: RunConfig, strategy: AdapterStrategy, global_state: dict
) -> tuple[torch.nn.Module, list[str]]:
    """A fresh model with the broadcast adapter state; only what the strategy trains has
    gradients. Returns it with its adapter tensor names."""
    data = federated_data(cfg)
    model = strategy.new_model(data)
    names = adapter_names(model)
    load_adapter_state(model, global_state)
    set_trainable(model, names, strategy.trainable)
    return model, names
