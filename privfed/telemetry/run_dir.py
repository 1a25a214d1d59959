"""The run directory: everything a run writes, and how a killed run is resumed.

config.yaml          the composed, validated config (resume reads it back)
metrics.jsonl        one JSON object per finished round
summary.json         final figures
ledger.sqlite        the embedded accountant's ledger (per-client privacy events)
checkpoints/         round_NNNN.pt: global adapter state, strategy state, RNG, ledger rows
plot.png             accuracy and epsilon per round

Beside it, ``<run>.devices/`` is the simulated devices' own storage, not the server's: each
device's releases (``releases/``) and, under user-level DP, its own record-level ledger
(``client-k/device-ledger.sqlite``). The server never reads it; on real devices it is each
device's disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"

    config_file = property(lambda self: self.path / "config.yaml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    summary_file = property(lambda self: self.path / "summary.json")
    ledger_file = property(lambda self: self.path / "ledger.sqlite")
    # user-level DP: the population's budget, spent by the server's own mechanism (DP-FedAvg)
    user_ledger_file = property(lambda self: self.path / "user_ledger.sqlite")
    plot_file = property(lambda self: self.path / "plot.png")
    devices_path = property(lambda self: self.path.with_name(self.path.name + ".devices"))
    run_id_file = property(lambda self: self.path / "run_id")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metric lines of rounds after the last checkpoint (a killed run's partial round)."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        tmp = self.metrics_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        tmp.replace(self.metrics_file)

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def save_checkpoint(self, server_round: int, blob: dict[str, Any]) -> Path:
        self.checkpoints.mkdir(exist_ok=True)
        path = self.checkpoints / f"round_{server_round:04d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)  # atomic: a checkpoint is either whole or absent
        return path

    def latest_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoints.exists():
            return None
        files = sorted(self.checkpoints.glob("round_*.pt"))
        return torch.load(files[-1], weights_only=False) if files else None
