"""A strategy's one-off initialisation release before round 1 (Fed-SB's svd init): one Gaussian
mechanism on clipped per-example gradient sums, charged like every other release."""

from __future__ import annotations

import secrets
import time

import torch
from flwr.app import Message

from privfed import keys
from privfed.client.release_protocol import released_once, reply
from privfed.config import RunConfig
from privfed.data.datasets import TokenizedSplit
from privfed.data.federated import federated_data
from privfed.keys import client_id
from privfed.models.backbone import load_adapter_state
from privfed.privacy.events import GaussianEvent
from privfed.privacy.gradients import clipped_gradient_sum, gaussian_noise_like
from privfed.privacy.invariants import PrivacyInvariantError, required
from privfed.privacy.ledger import EventKey
from privfed.randomness import RandomStream, public_seed
from privfed.strategies.base import AdapterStrategy


def init_round(
    cfg: RunConfig,
    msg: Message,
    strategy: AdapterStrategy,
    global_state: dict,
    partition_id: int,
    started: float,
) -> Message:
    """A strategy's one-off initialisation release (Fed-SB's svd init): the sum of per-example
    gradients of the named weights over the whole local dataset, clipped to L2 norm C, plus
    N(0, (sigma_init C)^2) noise from a fresh secret stream: one Gaussian mechanism, charged
    like every other release."""
    config = msg.content.config_records[keys.CONFIG]
    data = federated_data(cfg)
    local = data.client_examples(partition_id)  # an audit's canaries enter DP-SGD only
    if not isinstance(local, TokenizedSplit):
        raise PrivacyInvariantError(f"{strategy.name}'s init takes token rows (trains=adapters)")
    names = strategy.init_gradient_names(global_state)
    private = cfg.privacy.enabled
    model = strategy.new_model(data)
    params = dict(model.named_parameters())
    declared = {n: torch.zeros(params[n].shape, dtype=params[n].dtype) for n in names}

    def release() -> dict:
        load_adapter_state(model, global_state)
        dropout = secrets.randbits(63) if private else public_seed(cfg.seed, "init.dropout")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(dropout)
            sums = clipped_gradient_sum(
                model,
                local,
                names,
                clip="l2" if private else "none",
                bound=cfg.privacy.max_grad_norm,
                batch_size=cfg.train.physical_batch_size,
                device=cfg.model.device,
            )
        metrics: dict[str, float] = {
            keys.NUM_EXAMPLES: len(local),
            keys.PARTITION_ID: partition_id,
            keys.SAT_OUT: 0,
        }
        if private:
            (event,) = strategy.init_events()
            if not isinstance(event, GaussianEvent):
                raise PrivacyInvariantError(f"{strategy.name}: the init release is not Gaussian")
            clip = required(cfg.privacy.max_grad_norm, "privacy.max_grad_norm")
            noise = gaussian_noise_like(
                sums,
                event.sigma * clip,
                RandomStream.secret(f"{strategy.name}.init_noise"),
            )
            sums = {n: sums[n] + noise[n] for n in sums}
        else:
            metrics[keys.TRAIN_TIME] = time.perf_counter() - started
        return {"payload": sums, "metrics": metrics}

    if not private:
        out = release()
        return reply(cfg, msg, out["payload"], out["metrics"], declared)
    (event,) = strategy.init_events()
    key = EventKey(str(config[keys.RUN_ID]), client_id(partition_id), 0, f"{strategy.name}_init")
    return released_once(cfg, msg, key, event, partition_id, release, declared)
