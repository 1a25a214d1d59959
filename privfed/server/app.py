"""The Flower ServerApp.

In simulation the CLI binds the run it prepared (server/prepared.py) and the run directory in with
:func:`make_server_app`; a deployed ServerApp (``app`` below, started by a SuperLink through
``flwr run``) reads the config and the directory from ``context.run_config`` and prepares the
run from them (its noise multipliers are written in that config: checked, not searched).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from privfed import keys
from privfed.client.context import config_from_context
from privfed.config import RunConfig
from privfed.server.loop import run_federation
from privfed.server.prepared import PreparedRun
from privfed.telemetry.run_dir import RunDirectory


def make_server_app(
    cfg: RunConfig | None = None,
    run_dir: str | None = None,
    prepared: PreparedRun | None = None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or config_from_context(context)
        directory = run_dir or str(context.run_config.get(keys.RUN_DIR_KEY) or "privfed-run")
        run_federation(grid, run_cfg, RunDirectory(directory), prepared)

    return app


# For deployments: `flwr run` loads `privfed.server.app:app`.
app = make_server_app()
