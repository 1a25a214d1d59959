"""Submit the same ServerApp/ClientApp to a running SuperLink (``federation=deployment``).

The validated config travels as ``run_config["privfed-config"]`` (base64 JSON) through
``flwr run``; SuperNodes run ``privfed.client.app:app`` with ``--node-config
"partition-id=<i> num-partitions=<n>"``.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from privfed import keys
from privfed.config import RunConfig
from privfed.server.app import RUN_DIR_KEY
from privfed.telemetry.run_dir import RunDirectory

APP_DIR = Path(__file__).resolve().parent.parent


def submit(cfg: RunConfig, run_dir: RunDirectory) -> None:
    encoded = base64.b64encode(cfg.model_dump_json(by_alias=True).encode()).decode()
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(f'{keys.RUN_CONFIG_JSON} = "{encoded}"\n')
        fh.write(f'{RUN_DIR_KEY} = "{run_dir.path.resolve()}"\n')
        overrides = fh.name
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    cmd = ["flwr", "run", str(APP_DIR), str(cfg.federation.superlink), "--run-config", overrides,
           "--stream"]
    try:
        proc = subprocess.run(cmd, env=env, check=False)
    finally:
        os.unlink(overrides)
    if proc.returncode != 0:
        print(f"privfed: `flwr run` exited with {proc.returncode}", file=sys.stderr)
        raise SystemExit(proc.returncode)
