"""The simulation engine: the only module that imports ``flwr.simulation`` and ``ray``.

It runs a prepared run on Flower's simulation runtime with the Ray backend. Each
simulated client gets ``sim.num_cpus_per_client`` CPUs and a (possibly fractional)
``sim.num_gpus_per_client`` GPU; Ray packs as many worker actors as fit, and each
actor serves many clients in turn, reusing its cached task environment.

A worker actor whose process dies (the OOM killer, a segfault, ``kill -9``) is
restarted by Ray (``sim.max_worker_restarts``, passed to the actor options through
Flower's ``client_resources``): the message it was serving fails and is recorded,
and later rounds run at full strength. Flower's actor pool alone would keep the
dead actor and fail its clients in every later round.

With ``sim.ray_address`` the run joins an existing Ray cluster instead of starting
one, so the simulation can span machines: ``ray start --head`` on one machine,
``ray start --address=HEAD:6379`` on the others, then run with
``sim.ray_address=auto`` (or ``HEAD:6379``) on the head.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from fedimg.config import SimConfig
from fedimg.errors import ConfigError
from fedimg.clientapp.app import app as client_app
from fedimg.build import PreparedRun
from fedimg.serverapp.app import make_server_app

log = logging.getLogger(__name__)


def backend_config(sim: SimConfig) -> dict[str, Any]:
    """Flower's ``backend_config`` for the Ray backend."""
    init_args: dict[str, Any] = {"include_dashboard": False}
    if sim.ray_address:
        init_args["address"] = sim.ray_address
    else:
        if sim.ray_num_cpus is not None:
            init_args["num_cpus"] = sim.ray_num_cpus
        if sim.ray_num_gpus is not None:
            init_args["num_gpus"] = sim.ray_num_gpus
    # Flower passes client_resources to ClientAppActor.options(**resources) and reads
    # only num_cpus/num_gpus itself, so Ray's actor restart policy can ride along.
    return {"client_resources": {"num_cpus": sim.num_cpus_per_client,
                                 "num_gpus": sim.num_gpus_per_client,
                                 "max_restarts": sim.max_worker_restarts},
            "init_args": init_args}


def start_ray(sim: SimConfig) -> None:
    """Start (or join) Ray and check that one client's resources fit in the cluster.

    Flower's backend would start Ray itself, but a request that fits no worker leaves
    its actor pool empty while the ServerApp thread waits for replies for up to
    ``fl.timeout_s``; checking here turns that hang into a one-line ConfigError.
    """
    import ray

    if not ray.is_initialized():
        package_parent = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (package_parent,
                                                 os.environ.get("PYTHONPATH")) if p)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 logging_level=logging.WARNING, **backend_config(sim)["init_args"])
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if sim.num_cpus_per_client > cpus:
        raise ConfigError(f"sim.num_cpus_per_client={sim.num_cpus_per_client} but the Ray "
                          f"cluster has {cpus:g} CPUs; lower it or add machines")
    if sim.num_gpus_per_client > gpus:
        raise ConfigError(f"sim.num_gpus_per_client={sim.num_gpus_per_client} but the Ray "
                          f"cluster has {gpus:g} GPUs; set sim.num_gpus_per_client=0 on a "
                          "CPU-only machine")
    log.info("Ray: %g CPUs, %g GPUs -> up to %d clients at a time", cpus, gpus,
             int(min(cpus / sim.num_cpus_per_client,
                     gpus / sim.num_gpus_per_client if sim.num_gpus_per_client else 1e9)))


class _NotRunSimulationDeprecation(logging.Filter):
    """Hide Flower's console notice that ``run_simulation`` is deprecated.

    fedimg calls it on purpose (``flwr run`` is supported separately, see README); the
    notice still reaches ``run.log``, whose handler is not filtered.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def simulate(prepared: PreparedRun) -> dict[str, Any]:
    """Run all rounds of ``prepared`` on the Ray simulation engine; return the results."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
    for handler in logging.getLogger("flwr").handlers:
        handler.addFilter(_NotRunSimulationDeprecation())
    import ray
    from flwr.simulation import run_simulation

    start_ray(prepared.cfg.sim)
    prepared.engine_ready = time.perf_counter()
    results: dict[str, Any] = {}
    server_app = make_server_app(prepared, results.update)
    config = backend_config(prepared.cfg.sim)
    log.info("starting Flower simulation: %d clients, resources per client %s, ray %s",
             prepared.cfg.clients, config["client_resources"],
             prepared.cfg.sim.ray_address or "local")
    try:
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=prepared.cfg.clients, backend_config=config)
    finally:
        if ray.is_initialized() and not prepared.cfg.sim.ray_address:
            ray.shutdown()
    return results
