"""A client's released updates, kept so that a round is released at most once.

Re-running a round after a crash or a resume must not produce a *second, different* release of
the same round: two releases with the same noise but different clipped sums (dropout masks,
thread scheduling) would reveal their difference without noise, and two releases with fresh noise
would cost privacy that the idempotent ledger key does not charge. So a client stores its
release durably *before* recording the event and replying, and a re-run of the same
(run, client, round) sends exactly the stored bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from privfed.privacy.ledger import EventKey


class ReleaseStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: EventKey) -> Path:
        return self.root / key.run_id / key.client_id / f"round_{key.round:05d}_{key.name}.pt"

    def save(self, key: EventKey, release: dict[str, Any]) -> None:
        """Store a release durably, and drop this client's releases of earlier rounds: a server
        asks for round r only after it checkpointed round r - 1, so those are never asked again."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(release, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
        for old in path.parent.glob(f"round_*_{key.name}.pt"):
            if old != path and int(old.name.split("_")[1]) < key.round:
                old.unlink(missing_ok=True)

    def load(self, key: EventKey) -> dict[str, Any] | None:
        path = self._path(key)
        return torch.load(path, weights_only=False) if path.exists() else None
