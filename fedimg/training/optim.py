"""Client optimizers and the round-level learning-rate schedule.

Both are chosen by name from the config (``train.optimizer``, ``train.schedule``)
through a :class:`~fedimg.registry.Registry`, so an unknown name fails at build
time with the list of valid ones.

Every round each client builds a fresh optimizer (momentum and Adam moments are
not carried across rounds, as in FedAvg, McMahan et al. 2017). The learning rate
is therefore constant within a round and follows the schedule *over rounds*:

* ``constant``: ``lr``.
* ``cosine``: ``lr * 0.5 * (1 + cos(pi * (r - 1) / R))`` for round ``r`` of ``R``
  (SGDR without restarts, Loshchilov & Hutter 2017, ICLR). Round 1 gets ``lr``,
  the middle round ``lr / 2``, and the last round a small but non-zero rate.
* ``step``: ``lr``, times 0.1 once half of the rounds are done and times 0.1
  again once three quarters are done (``(r - 1) / R >= 0.5`` and ``>= 0.75``).

``train.warmup_rounds = k > 0`` first ramps the rate up linearly, ``lr * r / (k + 1)``
in rounds ``r = 1..k`` (the gradual warm-up of Goyal et al. 2017, "Accurate, Large
Minibatch SGD: Training ImageNet in 1 Hour", here per round), and then runs the
schedule over the remaining ``R - k`` rounds: round ``k + 1`` gets ``lr`` and the
progress above becomes ``(r - 1 - k) / (R - k)``. With ``k = 0`` nothing changes.

This is the *client* learning rate. A server step (``fl.server_lr`` of FedAvgM,
FedAdam, FedYogi, FedNova, SCAFFOLD) applies to the aggregated update and follows no
schedule: a round with a small client rate sends small updates, which the server
step scales as in every other round. SCAFFOLD's control variates read the same
scheduled rate (:func:`scheduled_lr`), so they stay consistent with the clients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from fedimg.config import TrainConfig
from fedimg.errors import ConfigError
from fedimg.registry import Registry

OptimizerBuilder = Callable[..., torch.optim.Optimizer]  # (params, *, cfg, lr)
Schedule = Callable[[float, float], float]  # (lr, progress in [0, 1)) -> lr

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer", config_key="train.optimizer")
SCHEDULES: Registry[Schedule] = Registry("lr schedule", config_key="train.schedule")


# --- optimizers --------------------------------------------------------------------


@OPTIMIZERS.register("sgd")
def sgd(
    params: list[torch.nn.Parameter], *, cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """SGD with heavy-ball momentum (``train.momentum``, Nesterov off) and L2 weight decay."""
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.momentum, nesterov=False, weight_decay=cfg.weight_decay
    )


@OPTIMIZERS.register("adamw")
def adamw(
    params: list[torch.nn.Parameter], *, cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay ``train.weight_decay``); ``train.momentum`` is unused."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], *, cfg: TrainConfig, lr: float
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over the trainable ``params`` only.

    Frozen parameters (``requires_grad=False``, e.g. the backbone in
    ``transfer.mode=head``) are left out, so weight decay never touches them.
    """
    builder = OPTIMIZERS.get(cfg.optimizer)
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ConfigError(
            "the model has no trainable parameters (all have requires_grad=False), "
            "so there is nothing to optimize; fix: choose transfer.mode=full or "
            "last_k, or check that the classifier head is not frozen"
        )
    return builder(trainable, cfg=cfg, lr=lr)


# --- learning-rate schedules over rounds ---------------------------------------------


@SCHEDULES.register("constant")
def constant(lr: float, progress: float) -> float:
    """The same learning rate every round."""
    return lr


@SCHEDULES.register("cosine")
def cosine(lr: float, progress: float) -> float:
    """Cosine annealing from ``lr`` towards 0 (Loshchilov & Hutter 2017)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("step")
def step(lr: float, progress: float) -> float:
    """``lr``, divided by 10 at 50% and again at 75% of the rounds."""
    milestones_passed = sum(progress >= m for m in (0.5, 0.75))
    return lr * 0.1**milestones_passed


def scheduled_lr(cfg: TrainConfig, *, server_round: int, total_rounds: int) -> float:
    """The client learning rate for ``server_round`` (1-based) of ``total_rounds``:
    the ``train.warmup_rounds`` linear warm-up, then ``train.schedule``."""
    if not 1 <= server_round <= total_rounds:
        raise ValueError(
            f"server_round={server_round} is outside 1..total_rounds={total_rounds}"
        )
    warmup = min(cfg.warmup_rounds, total_rounds - 1)
    if server_round <= warmup:
        return cfg.lr * server_round / (warmup + 1)
    schedule = SCHEDULES.get(cfg.schedule)
    progress = (server_round - 1 - warmup) / (total_rounds - warmup)  # in [0, 1)
    return schedule(cfg.lr, progress)
