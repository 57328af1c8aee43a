"""Local training of one client, in plain PyTorch (no flwr, ray or opacus here).

* :mod:`~fedimg.training.loop`: :func:`train_local` (one round, optional FedProx
  term) and :func:`evaluate`.
* :mod:`~fedimg.training.metrics`: accuracy, balanced accuracy, macro-F1, AUC, top-5.
* :mod:`~fedimg.training.optim`: the ``OPTIMIZERS`` and ``SCHEDULES`` registries, and
  :func:`scheduled_lr` (warm-up, then the schedule over rounds).
* :mod:`~fedimg.training.budget`: ``round_steps``, a round's steps under
  ``train.local_budget`` (epochs, steps, steps_per_sample).
* :mod:`~fedimg.training.losses`: balanced class weights, FedRS logit mask.
* :mod:`~fedimg.training.device`: ``train.device`` -> :class:`torch.device`, AMP dtype.
* :mod:`~fedimg.training.feature_cache`: :class:`TrunkCache`, the frozen trunk's
  features computed once, so that training and evaluation run only the tail.
* :mod:`~fedimg.training.vectorized`: many small clients' rounds in one
  ``torch.func.vmap`` step, equal to :func:`train_local` run for each;
  :mod:`~fedimg.training.vector_rule` times both paths once per shape and picks;
  :mod:`~fedimg.training.random_lanes` replays each client's random draws.
"""

from fedimg.training.device import resolve_device
from fedimg.training.feature_cache import TrunkCache
from fedimg.training.losses import (
    balanced_class_weights,
    calibrated_logit_shift,
    restricted_logit_scale,
)
from fedimg.training.loop import (
    TrainingDiverged,
    TrainResult,
    evaluate,
    predict,
    scores,
    train_local,
)
from fedimg.training.metrics import classification_metrics
from fedimg.training.optim import OPTIMIZERS, SCHEDULES, build_optimizer, scheduled_lr

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainResult",
    "TrainingDiverged",
    "TrunkCache",
    "balanced_class_weights",
    "build_optimizer",
    "classification_metrics",
    "evaluate",
    "predict",
    "scores",
    "resolve_device",
    "restricted_logit_scale",
    "calibrated_logit_shift",
    "scheduled_lr",
    "train_local",
]
