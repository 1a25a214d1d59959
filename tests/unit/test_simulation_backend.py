"""Which Ray a simulation runs its clients on."""

from __future__ import annotations

from privfed.simulation import backend_config

from ..helpers import TINY, run_config


def test_a_local_simulation_starts_a_ray_of_its_own():
    """Without an address ray.init() attaches to a cluster that `ray start` left on the machine
    (or that $RAY_ADDRESS names) and runs the clients there; "local" always starts a new one."""
    init = backend_config(run_config(*TINY, "federation.ray_num_cpus=2"))["init_args"]
    assert init["address"] == "local"
    assert init["num_cpus"] == 2


def test_a_named_cluster_is_attached_with_its_own_resources():
    init = backend_config(run_config(*TINY, "federation.ray_address=127.0.0.1:6379"))["init_args"]
    assert init["address"] == "127.0.0.1:6379"
    assert "num_cpus" not in init
