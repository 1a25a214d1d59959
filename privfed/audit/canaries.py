"""Gradient canaries for the one-run audit.

Canary j is an extra example in the data of client ``j mod K``, present with probability 1/2
(drawn from ``audit.seed``, independent of the run's seed). It is a row with label ``-1 - j``
whose per-sample gradient is not computed by the model but set to ``canary_scale * C`` on one
coordinate of the trainable adapter tensors (a Dirac canary, the paper's white-box setting), and
zero elsewhere. It is Poisson-sampled with the client's real examples, clipped and noised by the
very same Opacus optimizer, and counted in the client's dataset size (so in q and in the ledger).

What the auditor observes is what DP protects: each round's DP-SGD output of the canary's
client (the trained tensors the strategy then ships, compresses or re-factorises: all
post-processing). Canary j's score is minus the sum over rounds of that output's change at its
coordinate (gradient descent moves against the canary's gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch

from privfed.config import AuditConfig, RunConfig
from privfed.data.datasets import TokenizedSplit
from privfed.data.federated import FederatedData, federated_data


def is_canary(labels: torch.Tensor) -> torch.Tensor:
    return labels < 0


def canary_ids(labels: torch.Tensor) -> torch.Tensor:
    return -labels - 1


@dataclass(frozen=True)
class CanaryPlan:
    audit: AuditConfig
    num_clients: int

    @cached_property
    def included(self) -> np.ndarray:
        """Canary j is in its client's data (the secret bits the auditor guesses)."""
        return np.random.default_rng([self.audit.seed, 0]).random(self.audit.canaries) < 0.5

    def owned_by(self, partition_id: int) -> np.ndarray:
        """Ids of the canaries assigned to a client, in or out."""
        return np.arange(partition_id, self.audit.canaries, self.num_clients)

    def included_in(self, partition_id: int) -> np.ndarray:
        ids = self.owned_by(partition_id)
        return ids[self.included[ids]]

    def count(self, partition_id: int) -> int:
        """How many records the canaries add to a client's data (its included ones)."""
        return len(self.included_in(partition_id))

    def rows(self, partition_id: int, seq_len: int) -> TokenizedSplit:
        """The included canaries of a client as data rows (never fed to the model)."""
        ids = torch.as_tensor(self.included_in(partition_id), dtype=torch.int64)
        zeros = torch.zeros(len(ids), seq_len, dtype=torch.int64)
        return TokenizedSplit(zeros, zeros.clone(), -ids - 1)

    def coordinates(self, numels: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(tensor index, flat offset) of each canary's coordinate among the trainable tensors
        (in ``model.parameters()`` order): distinct, uniformly drawn from ``audit.seed``."""
        total = int(sum(numels))
        if total < self.audit.canaries:
            raise ValueError(
                f"audit.canaries: {self.audit.canaries} canaries need as many trainable "
                f"coordinates, the strategy trains {total}"
            )
        rng = np.random.default_rng([self.audit.seed, 1])
        flat = rng.choice(total, size=self.audit.canaries, replace=False)
        starts = np.cumsum([0, *numels])
        tensor = np.searchsorted(starts, flat, side="right") - 1
        return tensor, flat - starts[tensor]


def canary_plan(cfg: RunConfig) -> CanaryPlan | None:
    """A record-level audit's canaries (None otherwise: a user-level audit's canaries are
    devices the server adds, audit/user_canaries.py, not records)."""
    if not cfg.audit.enabled or cfg.privacy.user_level:
        return None
    return CanaryPlan(cfg.audit, cfg.federation.num_clients)


def audited_data(cfg: RunConfig) -> FederatedData:
    """The run's data as its server and clients see it: in a record-level audit, with the
    included canaries in each client's data (and counted in its size)."""
    data = federated_data(cfg)
    plan = canary_plan(cfg)
    return data if plan is None else replace(data, extra=plan)


class CanaryGradients:
    """Per-sample gradient rows of canaries for one client's trainable tensors."""

    def __init__(self, plan: CanaryPlan, params: list[torch.nn.Parameter], norm: float) -> None:
        self.plan, self.params, self.norm = plan, params, norm
        self.tensor, self.offset = plan.coordinates([p.numel() for p in params])

    def rows(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """One row per canary id for every trainable tensor: ``norm`` on the canary's
        coordinate, zero elsewhere."""
        ids_np = ids.cpu().numpy()
        rows = []
        for k, p in enumerate(self.params):
            row = torch.zeros(len(ids_np), p.numel(), dtype=p.dtype, device=p.device)
            for i, j in enumerate(ids_np):
                if self.tensor[j] == k:
                    row[i, int(self.offset[j])] = self.norm
            rows.append(row.view(len(ids_np), *p.shape))
        return rows

    # -- DP-SGD's SuppliedGradients (privacy/dp_sgd.py): canary rows never reach the model ------
    def supplied(self, labels: torch.Tensor) -> torch.Tensor | None:
        """The rows of a physical batch that are canaries (None: none in this batch)."""
        canary = is_canary(labels)
        return canary if bool(canary.any()) else None

    def supply(self, labels: torch.Tensor) -> None:
        """Add the per-sample gradients of the canary rows with these labels."""
        self.add_to_grad_samples(canary_ids(labels))

    def add_to_grad_samples(self, ids: torch.Tensor) -> None:
        """Append the canaries' rows to this physical batch's per-sample gradients (Opacus'
        ``p.grad_sample``), before the optimizer clips, sums and noises them."""
        for p, row in zip(self.params, self.rows(ids), strict=True):
            current = getattr(p, "grad_sample", None)
            if current is None:  # a physical batch of canaries only: no forward pass ran
                p.grad_sample = row  # type: ignore[attr-defined]  # set by Opacus
            elif isinstance(current, list):
                current[-1] = torch.cat([current[-1], row])
            else:
                p.grad_sample = torch.cat([current, row])  # type: ignore[attr-defined]  # set by Opacus

    def values(self, ids: np.ndarray, tensors: list[torch.Tensor] | None = None) -> np.ndarray:
        """The values at the given canaries' coordinates of ``tensors`` (one per trainable
        parameter, in order; default: the parameters themselves)."""
        where: list[torch.Tensor] = list(self.params) if tensors is None else tensors
        with torch.no_grad():
            return np.array(
                [float(where[self.tensor[j]].reshape(-1)[int(self.offset[j])]) for j in ids]
            )


class CanaryObservation:
    """An audit client's view of one round, what the auditors score: the sum over the round's
    DP-SGD steps of each release (clipped sum plus noise) at its canaries' coordinates."""

    def __init__(self, canaries: CanaryGradients, ids: np.ndarray) -> None:
        self.canaries, self.ids = canaries, ids
        self.released = np.zeros(len(ids))

    def __call__(self, release: list[torch.Tensor]) -> None:
        self.released += self.canaries.values(self.ids, release)
