"""Submit the same ServerApp/ClientApp to a running SuperLink (``federation=deployment``).

The validated config travels as ``run_config["privfed-config"]`` (base64 JSON) through
``flwr run``; SuperNodes run ``privfed.client.app:app`` with ``--node-config
"partition-id=<i> num-partitions=<n>"``. What is submitted is the app bundle of the privfed
installed here (app_bundle.py), whose digest devices approve; ``privfed-app build`` prints it.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from privfed import app_bundle, keys
from privfed.config import RunConfig
from privfed.keys import RUN_DIR_KEY
from privfed.telemetry.run_dir import RunDirectory

CONNECTION = "privfed"


def flower_home(cfg: RunConfig, run_dir: RunDirectory) -> Path:
    """A private FLWR_HOME whose config.toml names the SuperLink of this run (flwr >= 1.41 reads
    SuperLink connections from there, not from the app's pyproject)."""
    fed = cfg.federation
    home = run_dir.path / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{fed.superlink}"',
        f"insecure = {'true' if fed.insecure else 'false'}",
    ]
    if fed.root_certificates:
        lines.append(f'root-certificates = "{Path(fed.root_certificates).resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def submit(cfg: RunConfig, run_dir: RunDirectory) -> None:
    encoded = base64.b64encode(cfg.model_dump_json(by_alias=True).encode()).decode()
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(f'{keys.RUN_CONFIG_JSON} = "{encoded}"\n')
        fh.write(f'{RUN_DIR_KEY} = "{run_dir.path.resolve()}"\n')
        overrides = fh.name
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(flower_home(cfg, run_dir)),
    }
    with tempfile.TemporaryDirectory(prefix="privfed-app-") as tmp:
        app = app_bundle.write_app_dir(Path(tmp))
        cmd = ["flwr", "run", str(app), CONNECTION, "--run-config", overrides, "--stream"]
        try:
            proc = subprocess.run(cmd, env=env, check=False)
        finally:
            os.unlink(overrides)
    if proc.returncode != 0:
        print(f"privfed: `flwr run` exited with {proc.returncode}", file=sys.stderr)
        raise SystemExit(proc.returncode)
