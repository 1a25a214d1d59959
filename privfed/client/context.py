"""The run's config as a ClientApp or ServerApp receives it in deployment mode, and a device's
own data directory. Light on purpose: the ServerApp reads its config here without loading the
training client (client/app.py: Opacus, the models)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from flwr.app import Context

from privfed import keys
from privfed.config import RunConfig

DATA_DIR_ENV = "PRIVFED_DATA_DIR"  # an edge device's own data directory (privfed-edge --data-dir)


def config_from_context(context: Context) -> RunConfig:
    """The validated config a deployment carries in ``run_config`` (base64 JSON, so that TOML
    quoting never mangles it)."""
    raw = context.run_config.get(keys.RUN_CONFIG_JSON)
    if not isinstance(raw, str) or not raw:
        raise RuntimeError(f"run_config has no {keys.RUN_CONFIG_JSON!r}: submit with `privfed`")
    return on_this_device(RunConfig.model_validate_json(base64.b64decode(raw)))


def on_this_device(cfg: RunConfig) -> RunConfig:
    """The run's config with this device's own data directory ($PRIVFED_DATA_DIR): the
    tokenisation cache under it and, for ``data=hf``, the dataset at ``DATA_DIR/dataset``."""
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        return cfg
    data = {"cache_dir": str(Path(root) / "cache")}
    if cfg.data.name == "hf" and (Path(root) / "dataset").exists():
        data["path"] = str(Path(root) / "dataset")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data)})
