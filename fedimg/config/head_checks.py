"""Checks of what clients disclose in the clear before round 1, needing no registry.

* ``fl.head_init=ridge`` (Fed3R, :mod:`fedimg.serverapp.head_init`) has every client send
  the sums of its training features;
* ``train.class_weighting=federated`` (:mod:`fedimg.serverapp.class_counts`) has the
  server sum every client's class counts.

What that rules out is refused here, one line each: the value, why, the fix. The
baselines (``strategy=pooled|local``) fit the same head and weights in-process from
their own images (:mod:`fedimg.baselines`).
"""

from __future__ import annotations

import math

from fedimg.config.rules import check as _check
from fedimg.config.schema import FedimgConfig


def validate_head_init(cfg: FedimgConfig) -> None:
    """The ridge penalty's range, and the settings the feature sums cannot run with."""
    fl = cfg.fl
    _check(math.isfinite(fl.ridge_lambda) and fl.ridge_lambda > 0, f"fl.ridge_lambda="
           f"{fl.ridge_lambda} is impossible: the ridge penalty, relative to the features' "
           "mean energy, must be > 0. Fix: e.g. fl.ridge_lambda=0.1 (0.01..1)")
    if fl.head_init == "none":
        return
    _check(cfg.privacy.mode == "none", f"fl.head_init={fl.head_init} with privacy.mode="
           f"{cfg.privacy.mode}: the clients' feature sums would leave them outside the "
           "privacy accounting. Fix: fl.head_init=none, or privacy.mode=none")
    _check(fl.secure_aggregation == "none", f"fl.head_init={fl.head_init} with "
           f"fl.secure_aggregation={fl.secure_aggregation}: the feature sums are sent "
           "unmasked, which the run asked never to happen. Fix: fl.head_init=none")


def validate_class_weighting(cfg: FedimgConfig) -> None:
    """``federated`` class weights need each client's exact class counts at the server."""
    weighting = cfg.train.class_weighting
    if weighting != "federated":
        return
    _check(cfg.privacy.mode == "none", f"train.class_weighting={weighting} with privacy."
           f"mode={cfg.privacy.mode}: each client's exact class counts would leave it outside "
           "the privacy accounting. Fix: train.class_weighting=balanced (noisy local counts "
           "under DP), or privacy.mode=none")
    _check(cfg.fl.secure_aggregation == "none", f"train.class_weighting={weighting} with "
           f"fl.secure_aggregation={cfg.fl.secure_aggregation}: the class counts are sent "
           "unmasked, which the run asked never to happen. Fix: train.class_weighting=balanced")
