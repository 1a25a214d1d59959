"""Run a federation on Flower's Simulation Engine (Ray), in this process.

The ServerApp runs in a thread here; each ClientApp call runs in a Ray actor with the
configured fractional CPU/GPU resources (concurrent actors = Ray's CPUs / ``num_cpus``).
The validated config travels to the actors inside the ClientApp (cloudpickled), so
``context.run_config`` is not needed here (Flower's ``run_simulation`` leaves it empty).
"""

from __future__ import annotations

import logging
import os
import warnings

from privfed.client.app import make_client_app
from privfed.config import RunConfig
from privfed.server.app import make_server_app
from privfed.server.prepared import PreparedRun
from privfed.telemetry.console import say
from privfed.telemetry.run_dir import RunDirectory


def backend_config(cfg: RunConfig) -> dict:
    fed = cfg.federation
    init_args: dict = {
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": True,
    }
    if fed.ray_address is not None:  # attach: the cluster's nodes and resources, not ours
        init_args["address"] = fed.ray_address
    else:
        # A Ray of our own. Without an address ray.init() attaches to any cluster that
        # `ray start` left on this machine (or $RAY_ADDRESS names), silently running the
        # clients there; a study run hung when such a cluster went away under it.
        init_args["address"] = "local"
        if fed.ray_num_cpus is not None:
            init_args["num_cpus"] = fed.ray_num_cpus
    return {
        "client_resources": {
            "num_cpus": fed.client_resources.num_cpus,
            "num_gpus": fed.client_resources.num_gpus,
        },
        "init_args": init_args,
    }


class _DropRunSimulationDeprecation(logging.Filter):
    """We call ``run_simulation`` on purpose (module docstring); keep other warnings visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()


def run_simulation(prepared: PreparedRun, run_dir: RunDirectory) -> None:
    from flwr.simulation import run_simulation as flower_run_simulation

    from privfed import simulation_bundling, simulation_delivery

    simulation_delivery.install()  # one pass over the messages per sweep, not one per node
    cfg = prepared.cfg
    simulation_bundling.install(  # several per actor call
        cfg.federation.messages_per_call, cfg.federation.flush_per_call
    )
    logging.getLogger("flwr").addFilter(_DropRunSimulationDeprecation())
    fed = cfg.federation
    each = (
        f"{fed.num_clients} clients, {fed.client_resources.num_cpus:g} CPU "
        f"(and {fed.client_resources.num_gpus:g} GPU) each"
    )
    if fed.ray_address is not None:
        say(
            "actors",
            f"attaching to the Ray cluster at {fed.ray_address}: {each}",
            cfg.telemetry.progress,
        )
    else:
        cpus = fed.ray_num_cpus if fed.ray_num_cpus is not None else os.cpu_count() or 1
        say(
            "actors",
            f"starting Ray: {each}, up to "
            f"{max(1, int(cpus // fed.client_resources.num_cpus))} at a time on {cpus} CPUs",
            cfg.telemetry.progress,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        flower_run_simulation(
            server_app=make_server_app(cfg, str(run_dir.path), prepared),
            client_app=make_client_app(cfg),
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),
        )
    messages, calls = simulation_bundling.counts()
    if calls and messages > calls:
        say(
            "actors",
            f"{messages:,} client messages in {calls:,} actor calls "
            f"(up to {fed.messages_per_call} a call)",
            cfg.telemetry.progress,
        )
