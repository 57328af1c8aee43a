"""Local training and evaluation of one client: a plain PyTorch loop.

:func:`train_local` runs one federated round on a client: a fixed number of
optimizer steps over the client's loader, starting from the global weights that
the caller has loaded into ``model``. With ``proximal_mu > 0`` it adds the
FedProx proximal term (Li et al. 2020, "Federated Optimization in Heterogeneous
Networks", MLSys)

    loss = CE(model(x), y) + mu / 2 * ||w - w_global||^2

where ``w_global`` is a detached copy of the trainable weights taken when the
call starts. ``grad_offset`` pairs (parameter, o) add the linear term ``<o, w>`` to the
objective, i.e. ``o`` to that parameter's gradient at every step: SCAFFOLD's
correction ``c - c_i`` (Karimireddy et al. 2020) and FedDyn's ``-grad L_k`` (Acar et
al. 2021, with ``proximal_mu = alpha``). On CUDA, batches are copied with
``non_blocking=True``, the model and images may use the channels_last layout, and the
forward pass may run under autocast (bfloat16, or float16 with a GradScaler). On the
CPU none of that is used.

DP-SGD trains through the same loop: a :class:`StepHook` wraps the model (per-sample
gradients) and the optimizer (clipping and noise) for the round and splits each
Poisson batch of ``loader`` into micro-batches, with one optimizer update per batch.
Every number in :class:`TrainResult` means the same with and without it.

:func:`evaluate` gathers the logits of a whole loader (:func:`predict`) and returns
:func:`~fedimg.training.metrics.classification_metrics` plus the mean loss
(:func:`scores`, which also scores any subset of the rows).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fedimg.config import TrainConfig
from fedimg.errors import DataError, TrainingDiverged
from fedimg.training.budget import round_steps
from fedimg.training.device import amp_dtype, autocast, use_channels_last
from fedimg.training.metrics import class_counts, classification_metrics
from fedimg.training.optim import build_optimizer

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # x float32 (B, C, S, S), y int64 (B,)
Loader = Iterable[Batch]  # re-iterable, one pass = one epoch, has len()

_CHECK_EVERY = 10  # look for a non-finite loss every this many steps (one GPU sync)


@dataclass(frozen=True)
class TrainResult:
    """What one call of :func:`train_local` did; the same meaning with and without a hook.

    A *step* is one optimizer update, on one batch of ``loader`` (which a
    :class:`StepHook` may feed as several micro-batches). A step's loss is the sum of
    its samples' cross-entropies, each times its class weight when ``class_weights``
    are given (on FedRS-scaled, FedLC-shifted logits, no FedProx term), divided by
    its batch size.

    * ``loss``: the per-sample mean of that loss over all steps of the round.
    * ``first_loss`` / ``last_loss``: the same mean over the first / last *window* of
      steps: one epoch (``len(loader)`` steps) when the round runs
      ``local_epochs >= 2`` without ``local_steps``, else ``ceil(0.1 * steps)`` steps.
    * ``accuracy``: the fraction of samples whose (scaled) logits' argmax is the label,
      taken as the model changes during the round.
    """

    loss: float  # per-sample mean (class-weighted) cross-entropy, without the FedProx term
    accuracy: float  # training accuracy over the round (model changing as it goes)
    num_examples: int  # samples processed (a sample seen twice counts twice)
    steps: int  # optimizer steps (one per batch of the loader)
    seconds: float  # wall time of the steps (batches, forward, backward, update), no setup
    first_loss: float  # per-sample mean loss over the first window of steps
    last_loss: float  # per-sample mean loss over the last window of steps

    def as_metrics(self) -> dict[str, float]:
        """The ``train/*`` metrics of a client round (the same keys in every mode)."""
        return {"train/loss": self.loss, "train/accuracy": self.accuracy,
                "train/first_loss": self.first_loss, "train/last_loss": self.last_loss,
                "train/steps": float(self.steps), "train/seconds": self.seconds}


class StepHook(Protocol):
    """How a differentially private optimizer takes part in :func:`train_local`.

    DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS) is a
    sampler (Poisson batches: pass them as ``loader``), an optimizer that clips every
    per-sample gradient and adds noise, and a model wrapper that computes per-sample
    gradients; not a second loop. A hook supplies the last two and splits each batch
    into micro-batches that fit in memory; the loop, its loss and its metrics stay the
    same. Only plain PyTorch types appear here; Opacus' hook is
    :class:`fedimg.privacy.dp_sgd.DPSGDHook`.

    Under a hook, ``class_weights`` weigh the reported loss but not the backpropagated
    one: the hook's optimizer weighs each sample itself (DP-SGD must, after clipping,
    which would undo weights in the loss).
    """

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer
               ) -> AbstractContextManager[tuple[nn.Module, torch.optim.Optimizer]]:
        """While open: the module to run forward and the optimizer to step, wrapping
        ``model`` and the round's ``optimizer``; closing undoes the wrapping."""
        ...

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor) -> Iterable[Batch]:
        """The pieces of one batch (at least one); the loop calls the optimizer's
        ``step()`` after each piece, and the optimizer updates once per batch."""
        ...


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
    logit_shift: torch.Tensor | None = None,
    hook: StepHook | None = None,
    grad_offset: Sequence[tuple[nn.Parameter, torch.Tensor]] = (),
    proximal_anchors: Sequence[tuple[nn.Parameter, torch.Tensor]] = (),
) -> TrainResult:
    """Train ``model`` in place on ``loader`` for one round and report how it went.

    Runs ``cfg.local_epochs`` passes over ``loader``, or exactly
    ``cfg.local_steps`` optimizer steps (cycling through the loader) when that is
    set, or the steps another ``cfg.local_budget`` gives (:mod:`.budget`). A fresh
    optimizer (``cfg.optimizer``) is built unless ``optimizer`` is given; its learning
    rate is set to ``lr``. ``hook`` (e.g. DP-SGD's) wraps the
    model and that optimizer for the round and feeds each batch as micro-batches.
    ``class_weights`` (K,) weights each sample's cross-entropy by its class.
    ``logit_scale`` (K,) multiplies the logits before the loss: FedRS (Li & Zhan
    2021, "FedRS: Federated Learning with Restricted Softmax for Label Distribution
    Non-IID Data") scales the classes a client never sees by alpha < 1, so that its
    few classes do not push the others' scores down as hard. ``logit_shift`` (K,) is
    then added: FedLC's calibration (:func:`~fedimg.training.losses.calibrated_logit_shift`).
    ``grad_offset``: (parameter, offset) pairs added to those gradients at every step
    (as the loss term ``<offset, w>``, so mixed precision's loss scaling covers it).
    ``proximal_anchors``: (parameter, centre) pairs of the proximal term, when its
    centre is not where the call starts: Ditto (Li et al. 2021) trains a client's
    personal model v from its own weights towards the global w, adding
    ``mu / 2 * ||v - w||^2``. Empty: every trainable parameter, centred at its start.
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
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchored = [(p, a.to(device=p.device, dtype=p.dtype)) for p, a in proximal_anchors]
    if proximal_mu > 0 and not anchored:  # FedProx: centred on the weights received
        anchored = [(p, p.detach().clone()) for p in trainable]
    attached = (hook.attach(model, optimizer) if hook is not None
                else nullcontext((model, optimizer)))
    with attached as (net, step_optimizer):
        step = _Step(
            net=net, optimizer=step_optimizer, device=device, dtype=dtype,
            scaler=torch.amp.GradScaler("cuda", enabled=dtype is torch.float16),
            weight=class_weights.to(device) if class_weights is not None else None,
            weigh_objective=hook is None,
            scale=logit_scale.to(device) if logit_scale is not None else None,
            shift=logit_shift.to(device) if logit_shift is not None else None,
            proximal_mu=proximal_mu, params=[p for p, _ in anchored],
            anchors=[a for _, a in anchored] if proximal_mu > 0 else None,
            offsets=tuple((p, o.to(device=p.device, dtype=p.dtype)) for p, o in grad_offset))
        return _run(step, loader, hook, total_steps=total_steps, memory_format=memory_format,
                    lr=lr, window=_window(loader, cfg, total_steps))


def predict(model: nn.Module, loader: Loader, *, device: torch.device,
            amp: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Float logits (N, K) and labels (N,) of ``model`` over ``loader``, in its order.

    None for an empty loader. The model's train/eval mode is restored afterwards.
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
        return None
    return torch.cat(all_logits), torch.cat(all_labels)


def scores(logits: torch.Tensor, labels: torch.Tensor, *,
           num_classes: int) -> dict[str, float]:
    """Classification metrics of ``logits`` (N, K), the mean loss and ``num_examples``."""
    with torch.inference_mode():
        metrics = classification_metrics(logits, labels, num_classes=num_classes)
        metrics["loss"] = float(F.cross_entropy(logits, labels))
    metrics["num_examples"] = len(labels)
    return metrics


def evaluate(
    model: nn.Module,
    loader: Loader,
    *,
    device: torch.device,
    num_classes: int,
    amp: bool = False,
    per_class: bool = False,
) -> dict[str, float]:
    """Metrics of ``model`` on ``loader``: classification metrics, "loss", "num_examples",
    and with ``per_class`` each present class's support and hits (``count/*``).

    An empty loader gives ``{"num_examples": 0}`` only. The model's train/eval
    mode is restored afterwards.
    """
    predicted = predict(model, loader, device=device, amp=amp)
    if predicted is None:
        return {"num_examples": 0}
    metrics = scores(*predicted, num_classes=num_classes)
    return {**metrics, **class_counts(*predicted)} if per_class else metrics


# --- helpers -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One forward, loss, backward and optimizer step; fixed for the round."""

    net: nn.Module  # the model, or the hook's wrapper of it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for float32
    weight: torch.Tensor | None  # (K,) class weights of the loss
    weigh_objective: bool  # False under a hook: its optimizer weighs the samples
    scale: torch.Tensor | None  # (K,) FedRS logit scale
    shift: torch.Tensor | None  # (K,) FedLC logit shift, after the scale
    proximal_mu: float
    params: list[torch.nn.Parameter]  # the proximal term's parameters (the trainable ones)
    anchors: list[torch.Tensor] | None  # their global values (FedProx), or None
    offsets: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # (param, gradient offset)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step on ``x`` (b, C, S, S), ``y`` (b,); returns the batch's loss sum and its logits."""
        with autocast(self.device, self.dtype):
            logits = self.net(x)  # (b, K)
            if self.scale is not None:
                logits = logits * self.scale
            if self.shift is not None:
                logits = logits + self.shift
            # sum / b rather than mean: a batch of size 0 (Poisson sampling) gives 0, not NaN
            summed = F.cross_entropy(logits, y, weight=self.weight, reduction="sum")
            loss = summed / max(len(y), 1)
            if self.weight is not None and not self.weigh_objective:
                loss = F.cross_entropy(logits, y, reduction="sum") / max(len(y), 1)
        objective = loss
        if self.anchors is not None:
            objective = loss + self.proximal_mu / 2 * _squared_distance(self.params, self.anchors)
        if self.offsets:  # d/dw <o, w> = o: the offset joins the gradient
            objective = objective + sum((p * o).sum() for p, o in self.offsets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return summed.detach(), logits.detach()


def _run(step: _Step, loader: Loader, hook: StepHook | None, *, total_steps: int,
         memory_format: torch.memory_format, lr: float, window: int) -> TrainResult:
    """The round's ``total_steps`` steps (each over the micro-batches of one batch), summarised."""
    device = step.device
    step_loss = torch.zeros(total_steps, device=device)  # (T,) mean loss of each step
    step_size = torch.zeros(total_steps, dtype=torch.long)  # (T,) batch sizes, on CPU
    correct = torch.zeros((), dtype=torch.long, device=device)
    start = time.perf_counter()
    for i, (x, y) in enumerate(_cycle(loader, total_steps)):
        # (B, C, S, S) images; cached features may be (B, D), which has no channels_last
        x = x.to(device, non_blocking=True,
                 memory_format=memory_format if x.dim() == 4 else torch.preserve_format)
        y = y.to(device, non_blocking=True)  # (B,)
        summed: torch.Tensor | None = None
        for xb, yb in hook.micro_batches(x, y) if hook is not None else ((x, y),):
            piece, logits = step(xb, yb)
            summed = piece if summed is None else summed + piece
            correct += (logits.argmax(dim=1) == yb).sum()
        if summed is None:
            raise ValueError("the step hook yielded no micro-batch for a batch")
        step_loss[i] = summed / max(len(y), 1)
        step_size[i] = len(y)
        if (i + 1) % _CHECK_EVERY == 0 or i + 1 == total_steps:
            _check_finite(step_loss[: i + 1], lr=lr)
    losses = step_loss.float().cpu()  # waits for the GPU
    return _summarise(losses, step_size, correct=int(correct), window=window,
                      seconds=time.perf_counter() - start)


def _count_steps(loader: Loader, cfg: TrainConfig) -> int:
    """Optimizer steps of one round under ``cfg.local_budget`` (:func:`round_steps`).

    The sample count is the loader's ``num_examples``; a loader without one counts
    ``len(loader) * batch_size`` samples.
    """
    batches = len(loader)  # type: ignore[arg-type]
    if batches == 0:
        raise DataError(
            "this client's training loader has no batches (an empty partition, or "
            "drop_last with fewer samples than train.batch_size); fix: raise "
            "data.min_partition_size or lower train.batch_size"
        )
    samples = getattr(loader, "num_examples", batches * cfg.batch_size)
    return round_steps(cfg, batches=batches, num_samples=int(samples))


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
    if cfg.local_budget == "epochs" and cfg.local_steps is None and cfg.local_epochs >= 2:
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
