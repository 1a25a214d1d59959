"""The device's own privacy budget: the guarantee does not rest on the server.

In a deployment the run's config (sigma, the budget, the ledger's address) comes from the
server, so a curious server could ask for little noise and register any budget it likes. A
device started with ``privfed-edge --epsilon E --delta D`` therefore keeps its own ledger on its
own disk with that budget, checks every release the server asks for against it *before*
training, and records it there before anything leaves. A round whose event (q, sigma, steps;
a Gaussian init; an RQM curve) would take the device past (E, D), whatever the server's config
says, is refused: the device sits out, trains nothing and sends nothing. The budget covers
everything the device ever releases, across runs. The operator's accountant (embedded or the
HTTP service) stays the federation's shared view; this ledger is the guarantee.

The device also refuses, outright, a run that is not private against the server (no record-level
DP-SGD and no secure aggregation: user-level DP with central noise sends the update in the
clear) or that is an audit (whose ``break_mechanism`` switches parts of the mechanism off on
purpose).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from privfed.config import RunConfig
from privfed.privacy.ledger import Ledger

EPSILON_ENV = "PRIVFED_DEVICE_EPSILON"
DELTA_ENV = "PRIVFED_DEVICE_DELTA"
LEDGER_ENV = "PRIVFED_DEVICE_LEDGER"  # default: $PRIVFED_DATA_DIR/device-ledger.sqlite
LEDGER_FILE = "device-ledger.sqlite"


@dataclass(frozen=True)
class DeviceBudget:
    epsilon: float
    delta: float
    ledger_path: Path

    @classmethod
    def from_env(cls) -> DeviceBudget | None:
        """The budget ``privfed-edge`` set for this device, or None (a simulated client, whose
        budget is the run's)."""
        raw = os.environ.get(EPSILON_ENV)
        if not raw:
            return None
        epsilon, delta = float(raw), float(os.environ.get(DELTA_ENV) or "1e-5")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"${EPSILON_ENV} must be a finite number > 0, got {raw!r}")
        if not 0 < delta < 1:
            raise ValueError(f"${DELTA_ENV} must be in (0, 1), got {delta!r}")
        path = os.environ.get(LEDGER_ENV)
        if not path:
            data_dir = os.environ.get("PRIVFED_DATA_DIR")
            if not data_dir:
                raise ValueError(f"${EPSILON_ENV} needs ${LEDGER_ENV} or $PRIVFED_DATA_DIR")
            path = str(Path(data_dir) / LEDGER_FILE)
        return cls(epsilon, delta, Path(path))

    def refusal(self, cfg: RunConfig) -> str | None:
        """Why this device takes no part in the run at all (None: each round is checked)."""
        p = cfg.privacy
        secure = p.user_level and p.user.aggregation == "secure"  # its noise added here
        if not p.enabled and not secure:
            if p.user_level:
                return (
                    "user-level DP with central noise: the server would see this device's "
                    "update in the clear (privacy.user.aggregation=secure would not)"
                )
            return "the run is not private (privacy=none): nothing would be noised or charged"
        if cfg.audit.enabled or cfg.audit.break_mechanism != "none":
            return "the run is an audit (audit.* set): audits run on simulated federations only"
        return None

    def ledger(self, client_id: str) -> Ledger:
        """The device's ledger, with this device's budget for ``client_id``."""
        ledger = Ledger(self.ledger_path)
        ledger.set_budget(client_id, self.epsilon, self.delta)
        return ledger
