"""Vectorised or sequential: decided by timing both on this device, once per shape.

Whether one vmapped step of k clients beats k plain steps depends on the device (a
GPU gains from fewer, larger kernels; a 2-core CPU may not), on the trainable part
(a head on cached features, or conv blocks), on k and on the batch shape, so the
choice is measured rather than guessed. :class:`VectorizeRule` probes once per key
``(model signature, k, batch shape, device)``:

* sequential: one :func:`~fedimg.training.loop.train_local` step on a copy of the
  model, times k (its two runs, the faster kept: the first warms caches up);
* vectorised: one :func:`~fedimg.training.vectorized.train_vectorized` step of k
  clients on the same synthetic batch (twice, the faster kept);

and picks the faster (the sequential path unless the vectorised one is faster by
``margin``); the decision and both timings are logged and cached. The probe costs
about four times k steps, once per key, and leaves the model, the loaders and the
global random state untouched. ``clock`` is injectable so tests can fake the timer.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedimg.config import TrainConfig
from fedimg.training.loop import train_local
from fedimg.training.vectorized import (
    ClientJob,
    ClientOutcome,
    refusal,
    train_sequential,
    train_vectorized,
)

logger = logging.getLogger(__name__)

Key = tuple[str, int, tuple[int, ...], str]  # (model signature, k, batch shape, device)


@dataclass(frozen=True)
class Decision:
    """The measured choice for one key, with the timings it rests on."""

    vectorize: bool
    sequential_s: float  # k single-client steps (extrapolated from one)
    vectorized_s: float  # one step of k clients together


class VectorizeRule:
    """Decides, per key and from one timing of each path, which one trains a cohort."""

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter,
                 margin: float = 1.0) -> None:
        self._clock = clock
        self._margin = margin  # vectorise only if vectorized_s * margin < sequential_s
        self._decisions: dict[Key, Decision] = {}

    def decide(self, model: nn.Module, *, k: int, batch_shape: Sequence[int],
               num_classes: int, cfg: TrainConfig, device: torch.device) -> Decision:
        """The (cached) decision for ``k`` clients with input batches of ``batch_shape``."""
        key = (_signature(model), k, tuple(batch_shape), str(device))
        if key not in self._decisions:
            self._decisions[key] = self._measure(model, key, num_classes=num_classes,
                                                 cfg=cfg, device=device)
        return self._decisions[key]

    def _measure(self, model: nn.Module, key: Key, *, num_classes: int, cfg: TrainConfig,
                 device: torch.device) -> Decision:
        _, k, shape, _ = key
        probe = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(shape, generator=g), torch.randint(num_classes, shape[:1], generator=g))
        one = replace(cfg, local_steps=1)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            sequential = k * self._fastest(
                lambda: train_local(probe, [batch], cfg=one, lr=cfg.lr, device=device), device)
            jobs = [ClientJob(loader=[batch], seed=i) for i in range(k)]
            vectorized = self._fastest(
                lambda: train_vectorized(probe, jobs, cfg=one, lr=cfg.lr, device=device), device)
        decision = Decision(vectorize=vectorized * self._margin < sequential,
                            sequential_s=sequential, vectorized_s=vectorized)
        logger.info("%d clients, batch %s on %s: %s (one step: sequential %.4fs for all, "
                    "vectorised %.4fs)", k, "x".join(map(str, shape)), device,
                    "vectorised" if decision.vectorize else "sequential",
                    sequential, vectorized)
        return decision

    def _fastest(self, run: Callable[[], object], device: torch.device) -> float:
        """The faster of two timed runs of ``run`` (the first one also warms up)."""
        times = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = self._clock()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(self._clock() - start)
        return min(times)


def train_clients(model: nn.Module, jobs: Sequence[ClientJob], *, cfg: TrainConfig, lr: float,
                  device: torch.device, batch_shape: Sequence[int], num_classes: int,
                  rule: VectorizeRule, proximal_mu: float = 0.0) -> list[ClientOutcome]:
    """Train a cohort vectorised when eligible and measured faster, else one by one.

    ``batch_shape`` is a full training batch's input shape (B, C, S, S) or (B, D), for
    the rule's probe. ``model`` keeps its weights either way; each outcome holds a
    client's trained tensors.
    """
    reason = refusal(model, cfg=cfg, device=device)
    vectorize = reason is None and len(jobs) > 1 and rule.decide(
        model, k=len(jobs), batch_shape=batch_shape, num_classes=num_classes,
        cfg=cfg, device=device).vectorize
    if reason is not None:
        logger.debug("%d clients trained one by one: %s", len(jobs), reason)
    train = train_vectorized if vectorize else train_sequential
    return train(model, jobs, cfg=cfg, lr=lr, device=device, proximal_mu=proximal_mu)


def _signature(model: nn.Module) -> str:
    """The model's class and its trainable parameters' shapes: what the timing depends on."""
    shapes = ",".join(f"{tuple(p.shape)}" for p in model.parameters() if p.requires_grad)
    return f"{type(model).__name__}[{shapes}]"
