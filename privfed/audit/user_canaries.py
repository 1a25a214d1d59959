"""The one-run audit of user-level DP: canary *devices* instead of canary records.

Canary j is an extra device of the population, present with probability 1/2 (the same secret
bits as the record-level audit, from ``audit.seed``). A present canary is Poisson-sampled like
every device (rate q, from a secret stream the auditor never sees) and, when sampled, sends an
update of ``canary_scale * C`` on one coordinate of the payload (its own, distinct: a Dirac
canary) and zero elsewhere. The server clips it to C and adds it to the round's sum before the
noise, exactly as a real device's update: DP-FedAvg cannot tell them apart.

What the auditor observes is what user-level DP protects: each round's release minus the
broadcast. Canary j's score is the sum over rounds of that at its coordinate. A mechanism that
is (epsilon, delta)-DP per device cannot let the auditor tell present canaries from absent ones
better than :mod:`privfed.audit.bound` allows; the audit (:mod:`privfed.audit.user_report`)
passes when its lower bound stays under the population's epsilon (the run's ``epsilon_user``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from privfed.audit.canaries import CanaryPlan
from privfed.config import RunConfig
from privfed.randomness import RandomStream
from privfed.tensors import State

OBSERVATIONS = "user_round_*.npy"  # read by audit/user_report.py


class UserCanaries:
    """The server's side of a user-level audit: the canary devices' updates each round, and
    what the auditor observes of each release."""

    def __init__(self, cfg: RunConfig, reference: State, rate: float, audit_dir: Path) -> None:
        """``rate``: the devices' Poisson sampling rate, which the canaries share."""
        self.plan = CanaryPlan(cfg.audit, cfg.federation.num_clients)
        self.names = sorted(reference)
        tensor, offset = self.plan.coordinates([reference[n].numel() for n in self.names])
        self.tensor, self.offset = tensor, offset
        self.rate = rate
        self.scale = cfg.audit.canary_scale
        self.audit_dir = audit_dir

    def updates(self, reference: State, clip_norm: float) -> list[State]:
        """This round's sampled present canaries' updates (over C: the server clips them)."""
        present = np.flatnonzero(self.plan.included)
        picked = RandomStream.secret("audit.user_canary_sampling").bernoulli(
            len(present), self.rate
        )
        out = []
        for j in present[picked.numpy()]:
            update = {n: torch.zeros(reference[n].shape, dtype=torch.float64) for n in self.names}
            update[self.names[self.tensor[j]]].view(-1)[int(self.offset[j])] = (
                self.scale * clip_norm
            )
            out.append(update)
        return out

    def observe(self, server_round: int, released: State, reference: State) -> None:
        """The release minus the broadcast at every canary's coordinate, one file per round (a
        replayed round replaces its file)."""
        flat = [(released[n].double() - reference[n].double()).reshape(-1) for n in self.names]
        values = np.array(
            [float(flat[t][o]) for t, o in zip(self.tensor, self.offset, strict=True)]
        )
        self.audit_dir.mkdir(parents=True, exist_ok=True)
        path = self.audit_dir / f"user_round_{server_round:05d}.npy"
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, values)
        tmp.replace(path)
