"""Local training and evaluation of one client: a plain PyTorch loop.

:func:`train_local` runs one federated round on a client: a fixed number of
optimizer steps over the client's loader, starting from the global weights that
the caller has loaded into ``model``. With ``proximal_mu > 0`` it adds the
FedProx proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous
Networks", MLSys)

    loss = CE(model(x), y) + mu / 2 * ||w - w_global||^2

where ``w_global`` is a detached copy of the trainable weights taken when the
call starts. On CUDA, batches are copied with ``non_blocking=True``, the model
and images may use the channels_last layout, and the forward pass may run under
autocast (bfloat16, or float16 with a GradScaler). On the CPU none of that is used.

:func:`evaluate` gathers the logits of a whole loader and returns
:func:`~fedimg.training.metrics.classification_metrics` plus the mean loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedimg.config import TrainConfig
from fedimg.errors import DataError, TrainingDiverged
from fedimg.training.device import amp_dtype, autocast, use_channels_last
from fedimg.training.metrics import classification_metrics
from fedimg.training.optim import build_optimizer

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # x float32 (B, C, S, S), y int64 (B,)
Loader = Iterable[Batch]  # re-iterable, one pass = one epoch, has len()

_CHECK_EVERY = 10  # look for a non-finite loss every this many steps (one GPU sync)


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_local` did."""

    loss: float  # mean per-sample cross-entropy over the round (without the FedProx term)
    accuracy: float  # training accuracy over the round (model changing as it goes)
    num_examples: int  # samples processed (a sample seen twice counts twice)
    steps: int  # optimizer steps
    seconds: float  # wall time of the loop
    first_loss: float  # mean loss over the first epoch, or the first 10% of steps
    last_loss: float  # mean loss over the last epoch, or the last 10% of steps


def train_local(
    model: nn.Module,
    loader: Loader,
    *,
    cfg: TrainConfig,
    lr: float,
    device: torch.device,
    proximal_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    class_weights: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``loader`` for one round and report how it went.

    Runs ``cfg.local_epochs`` passes over ``loader``, or exactly
    ``cfg.local_steps`` optimizer steps (cycling through the loader) when that is
    set. A fresh optimizer (``cfg.optimizer``) is built unless ``optimizer`` is
    given, e.g. a differentially private one; its learning rate is set to ``lr``.
    ``class_weights`` (K,) weights each sample's cross-entropy by its class.
    ``logit_scale`` (K,) multiplies the logits before the loss: FedRS (Li & Zhan
    2021, "FedRS: Federated Learning with Restricted Softmax for Label Distribution
    Non-IID Data") scales the classes a client never sees by alpha < 1, so that its
    few classes do not push the others' scores down as hard.
    Raises :class:`TrainingDiverged` when the loss stops being finite.
    """
    total_steps = _count_steps(loader, cfg)
    channels_last = use_channels_last(device, enabled=cfg.channels_last)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    dtype = amp_dtype(device, enabled=cfg.amp)  # None on CPU or with amp off
    model.to(device, memory_format=memory_format).train()
    if optimizer is None:
        optimizer = build_optimizer(model.parameters(), cfg=cfg, lr=lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    w_global = [p.detach().clone() for p in trainable] if proximal_mu > 0 else None
    weight = class_weights.to(device) if class_weights is not None else None
    scale = logit_scale.to(device) if logit_scale is not None else None

    step_loss = torch.zeros(total_steps, device=device)  # (T,) mean CE of each step
    step_size = torch.zeros(total_steps, dtype=torch.long)  # (T,) batch sizes, on CPU
    correct = torch.zeros((), dtype=torch.long, device=device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(_cycle(loader, total_steps)):
        x = x.to(device, non_blocking=True, memory_format=memory_format)  # (B, C, S, S)
        y = y.to(device, non_blocking=True)  # (B,)
        with autocast(device, dtype):
            logits = model(x)  # (B, K)
            if scale is not None:
                logits = logits * scale
            # sum / B rather than mean: a batch of size 0 (Poisson sampling) gives 0, not NaN
            loss = F.cross_entropy(logits, y, weight=weight, reduction="sum") / max(len(y), 1)
        objective = loss
        if w_global is not None:
            objective = loss + proximal_mu / 2 * _squared_distance(trainable, w_global)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        scaler.step(optimizer)
        scaler.update()

        step_loss[step] = loss.detach()
        step_size[step] = len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        if (step + 1) % _CHECK_EVERY == 0 or step + 1 == total_steps:
            _check_finite(step_loss[: step + 1], lr=lr)

    losses = step_loss.float().cpu()  # waits for the GPU
    window = _window(loader, cfg, total_steps)
    return _summarise(losses, step_size, correct=int(correct), window=window,
                      seconds=time.perf_counter() - start)


def evaluate(
    model: nn.Module,
    loader: Loader,
    *,
    device: torch.device,
    num_classes: int,
    amp: bool = False,
) -> dict[str, float]:
    """Metrics of ``model`` on ``loader``: classification metrics, "loss", "num_examples".

    An empty loader gives ``{"num_examples": 0}`` only. The model's train/eval
    mode is restored afterwards.
    """
    was_training = model.training
    model.to(device)
    model.eval()
    dtype = amp_dtype(device, enabled=amp)
    all_logits, all_labels = [], []
    with torch.inference_mode(), autocast(device, dtype):
        for x, y in loader:
            logits = model(x.to(device, non_blocking=True))  # (B, K)
            all_logits.append(logits.float())
            all_labels.append(y.to(device, non_blocking=True))  # (B,)
    model.train(was_training)
    if not all_labels:
        return {"num_examples": 0}
    with torch.inference_mode():
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)  # (N, K), (N,)
        metrics = classification_metrics(logits, labels, num_classes=num_classes)
        metrics["loss"] = float(F.cross_entropy(logits, labels))
    metrics["num_examples"] = len(labels)
    return metrics


# --- helpers -------------------------------------------------------------------------


def _count_steps(loader: Loader, cfg: TrainConfig) -> int:
    """Optimizer steps of one round: ``local_steps``, else ``local_epochs * len(loader)``."""
    batches = len(loader)  # type: ignore[arg-type]
    if batches == 0:
        raise DataError(
            "this client's training loader has no batches (an empty partition, or "
            "drop_last with fewer samples than train.batch_size); fix: raise "
            "data.min_partition_size or lower train.batch_size"
        )
    return cfg.local_steps if cfg.local_steps is not None else cfg.local_epochs * batches


def _cycle(loader: Loader, total_steps: int) -> Iterator[Batch]:
    """Yield exactly ``total_steps`` batches, starting a new epoch when one ends."""
    step = 0
    while True:
        epoch_start = step
        for batch in loader:
            if step == total_steps:
                return
            yield batch
            step += 1
        if step == total_steps:
            return
        if step == epoch_start:
            raise DataError("the training loader yielded no batches although len() > 0")


def _squared_distance(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """``sum ||p - a||^2`` over matching tensors: the FedProx proximal term without mu/2."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))  # type: ignore[return-value]


def _check_finite(losses: torch.Tensor, *, lr: float) -> None:
    """Raise :class:`TrainingDiverged` naming the first step whose loss is NaN or inf."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = int(bad[0]) + 1
        raise TrainingDiverged(
            f"training diverged: the loss is {float(losses[step - 1])} at local step "
            f"{step} with lr={lr:g}; fix: lower train.lr (e.g. train.lr={lr / 10:g}), "
            "or check the inputs for NaN"
        )


def _window(loader: Loader, cfg: TrainConfig, total_steps: int) -> int:
    """Steps averaged into first/last loss: one epoch if >= 2 epochs, else 10% of steps."""
    if cfg.local_steps is None and cfg.local_epochs >= 2:
        return len(loader)  # type: ignore[arg-type]
    return max(1, math.ceil(0.1 * total_steps))


def _summarise(
    losses: torch.Tensor, sizes: torch.Tensor, *, correct: int, window: int, seconds: float
) -> TrainResult:
    """Per-sample means over the round and over its first and last ``window`` steps; logged."""

    def mean(lo: int, hi: int) -> float:
        n = sizes[lo:hi].sum()
        return float((losses[lo:hi] * sizes[lo:hi]).sum() / n) if n else math.nan

    steps, num_examples = len(losses), int(sizes.sum())
    result = TrainResult(
        loss=mean(0, steps),
        accuracy=correct / num_examples if num_examples else math.nan,
        num_examples=num_examples,
        steps=steps,
        seconds=seconds,
        first_loss=mean(0, window),
        last_loss=mean(steps - window, steps),
    )
    logger.debug(
        "trained %d steps on %d samples in %.2fs: loss %.4f -> %.4f, accuracy %.3f",
        steps, num_examples, seconds, result.first_loss, result.last_loss, result.accuracy,
    )
    return result
