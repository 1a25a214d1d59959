"""Shared builders for tests (not a test module)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from privfed.cli import CONF_DIR  # the package's own config
from privfed.config import PrivacyConfig, RunConfig, TrainConfig, load_config


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compose_raw(*overrides: str) -> dict[str, Any]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    return raw


def run_config(*overrides: str) -> RunConfig:
    return load_config(compose_raw(*overrides))


# One example per step, q = 1, plain SGD with lr 1: an update equals minus the released gradient.
ONE_SGD_STEP = TrainConfig(
    local_epochs=1,
    local_steps=None,
    sampling="poisson",
    batch_size=1,
    physical_batch_size=1,
    optimizer="sgd",
    learning_rate=1.0,
    lr_schedule="constant",
    weighting="uniform",
)

TINY = ("model=tiny_bert", "data.max_examples=300", "federation.num_clients=3")


@functools.cache
def _dp_sgd_privacy() -> PrivacyConfig:
    return run_config(*TINY).privacy


def dp_privacy(**changes: Any) -> PrivacyConfig:
    """privacy=dp_sgd as conf/ gives it (the only source of defaults), with ``changes``,
    validated."""
    return PrivacyConfig.model_validate({**_dp_sgd_privacy().model_dump(), **changes})


def make_round(tmp_path: Path, cfg: RunConfig, server_round: int, sigma: float):
    """A train Message for partition 0 carrying the initial adapter state, and its Context."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from privfed import keys
    from privfed.data.federated import federated_data
    from privfed.models.backbone import adapter_names
    from privfed.strategies.registry import build_strategy

    data = federated_data(cfg)
    strategy = build_strategy(cfg)
    model = strategy.new_model(data)
    names = adapter_names(model)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    config = ConfigRecord(
        {
            keys.SERVER_ROUND: server_round,
            keys.NOISE_MULTIPLIER: sigma,
            keys.RUN_ID: "run",
            keys.LEDGER_PATH: str(tmp_path / "ledger.sqlite"),
            keys.DEVICES_DIR: str(tmp_path),  # releases under tmp_path / "releases"
        }
    )
    msg = Message(
        RecordDict({keys.ARRAYS: ArrayRecord(state), keys.CONFIG: config}),
        dst_node_id=5,
        message_type=MessageType.TRAIN,
    )
    context = Context(
        run_id=1,
        node_id=5,
        node_config={keys.NODE_PARTITION_ID: 0},
        state=RecordDict(),
        run_config={},
    )
    return msg, context, state, data


class SmallDisk:
    """A real, small filesystem (tmpfs) mounted at ``path`` for a test, to fill up: what a full
    disk does to SQLite (ENOSPC on a WAL append) cannot be faked faithfully. Needs root (CI runs
    as root; elsewhere the test is skipped with this reason). Unmounted on exit."""

    def __init__(self, path: Path, size_kib: int = 2048) -> None:
        self.path, self.size_kib = path, size_kib
        self.filler = path / "filler"

    def __enter__(self) -> SmallDisk:
        import subprocess

        import pytest

        self.path.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_kib}k", "tmpfs", str(self.path)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.decode().strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        import subprocess

        subprocess.run(["umount", "-l", str(self.path)], check=False)

    def fill(self) -> None:
        """Write until the filesystem is full (ENOSPC)."""
        with open(self.filler, "ab", buffering=0) as fh:
            try:
                while fh.write(b"\0" * 4096):
                    pass
            except OSError:  # ENOSPC: full
                pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        """Remount it read-only (what a failed disk or a wrong volume mount gives)."""
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)
