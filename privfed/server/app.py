"""The Flower ServerApp.

In simulation the CLI binds the validated config and the run directory in with
:func:`make_server_app`; a deployed ServerApp (``app`` below, started by a SuperLink through
``flwr run``) reads both from ``context.run_config``.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from privfed import keys
from privfed.client.context import config_from_context
from privfed.config import RunConfig
from privfed.server.loop import run_federation
from privfed.telemetry.run_dir import RunDirectory


def make_server_app(cfg: RunConfig | None = None, run_dir: str | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_context(context)
        directory = run_dir or str(context.run_config.get(keys.RUN_DIR_KEY) or "privfed-run")
        run_federation(grid, run_cfg, RunDirectory(directory))

    return app


# For deployments: `flwr run` loads `privfed.server.app:app`.
app = make_server_app()
