"""A round whose release is the strategy's own mechanism instead of DP-SGD (RQM's privacy
mode): the strategy's ``private_release`` under its ``planned_event``, charged like any other
release (client/release_protocol.py)."""

from __future__ import annotations

import secrets

import torch
from flwr.app import Message

from privfed import keys
from privfed.client.local_model import local_model
from privfed.client.release_protocol import released_once
from privfed.config import RunConfig
from privfed.data.federated import federated_data
from privfed.privacy.ledger import EventKey
from privfed.strategies.base import AdapterStrategy


def own_mechanism_round(
    cfg: RunConfig,
    msg: Message,
    key: EventKey,
    strategy: AdapterStrategy,
    global_state: dict,
    partition_id: int,
    declared: dict,
) -> Message:
    """A round whose release is the strategy's own mechanism (charged as its planned event)."""
    local = federated_data(cfg).client(partition_id)
    with local_model(cfg, strategy, global_state, keep=cfg.federation.reuse_client_model) as worker:
        worker.close_hooks()  # the strategy's release adds Opacus hooks of its own
        model = worker.model
        dims = sum(p.numel() for p in model.parameters() if p.requires_grad)
        event = strategy.planned_event(len(local), dims)

        def release() -> dict:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(secrets.randbits(63))  # dropout: fresh, like every DP round
                payload = strategy.private_release(
                    model, local, cfg.train.physical_batch_size, cfg.model.device
                )
            metrics = {
                keys.NUM_EXAMPLES: len(local),
                keys.STEPS: 1,
                keys.PARTITION_ID: partition_id,
                keys.SAT_OUT: 0,
            }
            return {"payload": payload, "metrics": metrics}

        return released_once(cfg, msg, key, event, partition_id, release, declared)
