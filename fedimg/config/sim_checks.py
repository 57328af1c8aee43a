"""Checks of ``sim.*``: Ray resources, devices, worker restarts and client cohorts.

``sim.cohort_size`` > 1 sends several small clients in one training message, trained
together (:mod:`fedimg.serverapp.cohorts`, :mod:`fedimg.clientapp.cohort`); what that
rules out is refused here, one line each: the value, why, the fix.
"""

from __future__ import annotations

from fedimg.config.rules import check as _check
from fedimg.config.schema import FedimgConfig


def validate_sim(cfg: FedimgConfig) -> None:
    """Ray resources, devices and worker restarts; then client cohorts."""
    sim = cfg.sim
    _check(sim.max_worker_restarts >= -1, f"sim.max_worker_restarts="
           f"{sim.max_worker_restarts} must be -1 (always), 0 (never) or a positive count")
    _check(sim.num_cpus_per_client > 0, f"sim.num_cpus_per_client="
           f"{sim.num_cpus_per_client} must be > 0")
    gpus = sim.num_gpus_per_client
    _check(gpus >= 0 and (gpus <= 1 or float(gpus).is_integer()),
           f"sim.num_gpus_per_client={gpus} must be a fraction in [0, 1] or a whole "
           "number of GPUs")
    device = cfg.train.device
    _check(not (device.startswith("cuda") and gpus == 0), f"train.device={device} "
           "but sim.num_gpus_per_client=0: Ray hides GPUs from clients given none; set "
           "sim.num_gpus_per_client (e.g. 0.25 = four clients per GPU) or train.device=auto")
    for name in ("ray_num_cpus", "ray_num_gpus"):
        value = getattr(sim, name)
        _check(value is None or value >= (1 if name == "ray_num_cpus" else 0),
               f"sim.{name}={value} is impossible")
    _validate_cohorts(cfg)


MAX_COHORT = 64  # sim.cohort_size: clients one message may carry


def _validate_cohorts(cfg: FedimgConfig) -> None:
    """``sim.cohort_size`` > 1 trains several clients per message: what that rules out."""
    k = cfg.sim.cohort_size
    _check(1 <= k <= MAX_COHORT, f"sim.cohort_size={k} is impossible: valid 1 (off) to "
           f"{MAX_COHORT}. Fix: e.g. sim.cohort_size=8")
    if k == 1:
        return
    p, fl = cfg.privacy, cfg.fl
    refused = {  # setting: (on, why a cohort cannot have it)
        "deploy.enabled=true": (cfg.deploy.enabled, "a deployed site is one client"),
        f"privacy.mode={p.mode}": (p.mode != "none", "privacy is accounted per client"),
        "fl.local_bn=true": (fl.local_bn, "FedBN keeps each client's BatchNorm in its node"),
        f"compression.kind={cfg.compression.kind}": (
            cfg.compression.kind != "none", "error feedback lives in each client's node"),
        f"fl.secure_aggregation={fl.secure_aggregation}": (
            fl.secure_aggregation != "none", "each client masks its own update"),
        "attack.*": (cfg.attack.byzantine_fraction > 0, "attacks are simulated per client"),
        f"train.optimizer={cfg.train.optimizer}": (
            cfg.train.optimizer != "sgd", "a cohort trains vectorised with SGD only"),
        "hetero.clock=real": (cfg.hetero.clock == "real", "a cohort replies as one message, "
                              "so its members cannot arrive at their own times"),
    }
    for setting, (on, why) in refused.items():
        _check(not on, f"sim.cohort_size={k} with {setting}: {why}. Fix: sim.cohort_size=1, "
               f"or drop {setting}")
