"""Checks of ``fl.personal`` (personalised federated learning), needing no registry.

Each personal mode keeps part of a model in the client's own state between rounds
(:mod:`fedimg.clientapp.personal`): FedPer (Arivazhagan et al. 2019) and FedRep
(Collins et al. 2021) the classification head, Ditto (Li et al. 2021) a whole personal
model. What that rules out is refused here, one line each: the value, why, the fix.
The strategy combinations (registry facts) are in :mod:`fedimg.resolve`.
"""

from __future__ import annotations

import math

from fedimg.config.rules import check as _check
from fedimg.config.schema import FedimgConfig


def validate_personal(cfg: FedimgConfig) -> None:
    """Ranges of the personal knobs, and the settings a personal mode cannot run with."""
    fl = cfg.fl
    _check(fl.fedrep_head_steps >= 0, f"fl.fedrep_head_steps={fl.fedrep_head_steps} is "
           "impossible: it counts FedRep's head steps per round (0 = the round's own "
           "steps). Fix: e.g. fl.fedrep_head_steps=10")
    _check(math.isfinite(fl.ditto_lambda) and fl.ditto_lambda >= 0, f"fl.ditto_lambda="
           f"{fl.ditto_lambda} is impossible: Ditto's pull towards the global model must be "
           ">= 0 (0 = purely local). Fix: e.g. fl.ditto_lambda=0.1 (the paper tries 0.01..2)")
    if fl.personal == "none":
        return
    p, head_only = f"fl.personal={fl.personal}", fl.personal in ("fedper", "fedrep")
    refused = {  # setting: (on, why this personal mode cannot have it, the fix)
        f"fl.secure_aggregation={fl.secure_aggregation}": (
            fl.secure_aggregation != "none", "the server sees only the masked sum, so it "
            "cannot check each reply's shared part, and SecAgg+'s rounds keep no personal "
            "state", "fl.secure_aggregation=none"),
        f"privacy.mode={cfg.privacy.mode}": (
            cfg.privacy.mode != "none", "the personal part trains and reports metrics on "
            "the client's data outside the privacy accounting", "privacy.mode=none"),
        f"sim.cohort_size={cfg.sim.cohort_size}": (
            cfg.sim.cohort_size > 1, "a cohort's members share one node, whose state "
            "cannot keep each member's personal part", "sim.cohort_size=1"),
        "fl.local_bn=true": (fl.local_bn, "FedBN also keeps part of the model in the "
                             "client's state; choose one kind of personalisation",
                             "fl.local_bn=false"),
        f"fl.personalize_steps={fl.personalize_steps}": (
            fl.personalize_steps > 0, "both report val/personal_*; the personal mode's "
            "model is the personalised one", "fl.personalize_steps=0"),
        f"transfer.mode={cfg.transfer.mode}": (
            head_only and cfg.transfer.mode == "head", "only the head trains, and the "
            "head stays with each client: nothing would be federated",
            "transfer.mode=full|last_k"),
        "transfer.train_head=false": (
            head_only and not cfg.transfer.train_head, "the personal part is the head, and "
            "a head that does not train never becomes the client's own (FedRep's head "
            "phase would have nothing to optimise)", "transfer.train_head=true"),
    }
    for setting, (on, why, fix) in refused.items():
        _check(not on, f"{p} with {setting}: {why}. Fix: {fix}, or fl.personal=none")
