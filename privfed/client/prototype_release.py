"""The head recipe's prototypes: each client's per-class sums of its features, noised once.

With ``recipe.prototypes=true`` the head starts as a nearest-prototype classifier before any
round (models/head.py). Each client releases, once, the sum of its examples' features per class:
a ``K x d`` matrix to which one example adds its (unit-norm) feature in its class's row. Adding
or removing an example moves it by at most 1 in L2 norm, so N(0, sigma_p^2) noise on every entry
is the Gaussian mechanism with noise multiplier sigma_p (``GaussianEvent(sigma_p)``), charged
like every other release (release_protocol.py). The server sums the clients' releases; the
class means' directions are the head's rows (post-processing).

Features are clipped to norm 1 here although they are unit-norm by construction
(data/features.py): the sensitivity must not rest on a preprocessing step elsewhere.
"""

from __future__ import annotations

import torch
from flwr.app import Message

from privfed import keys
from privfed.client.release_protocol import released_once, reply
from privfed.config import RunConfig
from privfed.data.features import FeatureSplit
from privfed.data.federated import federated_data
from privfed.keys import client_id
from privfed.privacy.calibration import prototype_noise_multiplier
from privfed.privacy.events import GaussianEvent
from privfed.privacy.ledger import EventKey
from privfed.randomness import RandomStream

EVENT_NAME = "prototypes"


def class_sums(local: FeatureSplit, num_classes: int) -> torch.Tensor:
    """Per-class sums of the features, each clipped to L2 norm 1 first (float64)."""
    x = local.features.to(torch.float64)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1.0)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, local.labels, x)
    return sums


def prototype_round(cfg: RunConfig, msg: Message, partition_id: int) -> Message:
    """Release this client's class sums (noised under DP) once, charged as a Gaussian event."""
    config = msg.content.config_records[keys.CONFIG]
    data = federated_data(cfg)
    local = data.client_features(partition_id)
    shape = (data.num_classes, local.features.shape[1])
    declared = {keys.PROTOTYPES: torch.zeros(shape, dtype=torch.float32)}
    sigma = prototype_noise_multiplier(cfg)

    def release() -> dict:
        sums = class_sums(local, data.num_classes)
        if sigma is not None:
            sums = sums + RandomStream.secret("prototypes.noise").normal(
                shape, sigma, dtype=torch.float64
            )
        metrics = {
            keys.NUM_EXAMPLES: len(local),
            keys.PARTITION_ID: partition_id,
            keys.SAT_OUT: 0,
        }
        return {"payload": {keys.PROTOTYPES: sums.to(torch.float32)}, "metrics": metrics}

    if sigma is None:  # privacy=none: nothing to charge
        out = release()
        return reply(cfg, msg, out["payload"], out["metrics"], declared)
    key = EventKey(str(config[keys.RUN_ID]), client_id(partition_id), 0, EVENT_NAME)
    return released_once(cfg, msg, key, GaussianEvent(sigma=sigma), partition_id, release, declared)
