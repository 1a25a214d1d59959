"""Shared builders for tests (not a test module)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from privfed.config import RunConfig, load_config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_raw(*overrides: str) -> dict[str, Any]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    return raw


def run_config(*overrides: str) -> RunConfig:
    return load_config(compose_raw(*overrides))


TINY = ("model=tiny_bert", "data.max_examples=300", "federation.num_clients=3")
