"""Sample-level DP-SGD for one client round, with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS): every
logical batch is drawn by Poisson sampling with rate q = B / N, each per-sample
gradient is clipped to ``max_grad_norm`` C, and Gaussian noise N(0, sigma^2 C^2)
is added to their sum. That is a sampler, an optimizer and a model wrapper, not a
second training loop: the steps run in :func:`fedimg.training.train_local`, with
:class:`DPSGDHook` supplying Opacus' ``GradSampleModule`` (per-sample gradients; hooks
mode with fedimg's grouped Conv2d rule, see :mod:`fedimg.privacy.grad_samplers`, or
functorch) and ``DPOptimizer`` (clip, noise, step), or with ``grad_sample_mode=ghost_mixed``
Opacus' fast-gradient-clipping pair, which needs only per-sample gradient *norms*
(mixed ghost clipping, :mod:`fedimg.privacy.norm_samplers`), and physical micro-batches, over
``UniformWithReplacementSampler``'s Poisson batches; the PRV/RDP accountants count the
steps. The model is the client's pretrained network with frozen BatchNorm and its
in-place operations rewritten (Opacus' hooks cannot see through them).

Sigma is calibrated once per client from its whole planned participation
(:mod:`fedimg.privacy.dp_budget`); the client's :class:`~fedimg.privacy.accounting.PrivacyLedger`
is kept between rounds by its keeper (a site's own disk, or Flower's ``context.state``
in simulation), and the accountant attached to the optimizer continues that history,
so epsilon accumulates. A client whose next
round would exceed its budget declines that round and every later one. Class weights
come from a noisy (accounted) release of the label counts and are applied after
clipping. Noise and batches are drawn from a secret source unless
``privacy.seeded_noise`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from fedimg.config import FedimgConfig, TrainConfig
from fedimg.data import InMemoryLoader
from fedimg.models import MODELS
from fedimg.privacy import grad_samplers  # noqa: F401 - registers Conv2d rule
from fedimg.privacy.norm_samplers import GhostClippingModule  # and the Conv2d norm rule
from fedimg.privacy.accounting import PrivacyLedger
from fedimg.privacy.batches import ShuffledBatches, private_batches  # noqa: F401 - re-export
from fedimg.privacy.dp_budget import (  # noqa: F401 - re-exported for callers
    Admit,
    adopted_ledger,
    client_ledger,
    noise_generator,
    sample_rate,
    steps_per_round,
)
from fedimg.privacy.protocols import ClientEnvironment, ClientRound
from fedimg.privacy.secure_noise import ChaChaStream
from fedimg.training import build_optimizer, scheduled_lr, train_local

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="Optimal order is the", module="opacus")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")


class _ClipNoise:
    """What fedimg adds to Opacus' DP optimizers: weights after clipping, clip counts, ChaCha noise.

    Weighting the loss (e.g. by inverse class frequency) is undone by clipping: every
    clipped gradient ends up with norm C whatever its weight. Here each per-sample
    gradient is clipped to C first and then scaled by its weight in [0, 1], so every
    sample still contributes at most C and the Gaussian mechanism, its noise and its
    accounting are unchanged. Set :attr:`sample_weights` (B,) before each ``step()``;
    None means weight 1. It also counts the per-sample gradients that were clipped.
    """

    params: list[nn.Parameter]
    max_grad_norm: float
    noise_multiplier: float

    def __init__(self, *args: Any, noise_stream: ChaChaStream | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise_stream = noise_stream
        self.samples_seen = 0
        self.samples_clipped = 0
        self.sample_weights: torch.Tensor | None = None

    def clip_factor(self, norms: torch.Tensor) -> torch.Tensor:
        """Each sample's factor (B,): min(1, C / norm) times its weight; counts the clipped."""
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.samples_seen += len(norms)
        self.samples_clipped += int((norms > self.max_grad_norm).sum())
        if self.sample_weights is not None:
            factor = factor * self.sample_weights.to(factor)
        return factor

    def add_noise(self) -> None:
        """Opacus' ``add_noise``, with N(0, sigma^2 C^2) from :attr:`noise_stream` if set."""
        if self.noise_stream is None:
            super().add_noise()  # type: ignore[misc]
            return
        noise = self.noise_stream.normal_like([p.summed_grad for p in self.params],
                                              std=self.noise_multiplier * self.max_grad_norm)
        for p, z in zip(self.params, noise):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + z).view_as(p)
            _mark_as_processed(p.summed_grad)


class WeightedDPOptimizer(_ClipNoise, DPOptimizer):
    """Opacus' DPOptimizer over materialised per-sample gradients, with :class:`_ClipNoise`."""

    def clip_and_accumulate(self) -> None:
        """Opacus' clip-and-sum (opacus/optimizers/optimizer.py), with weights and counts."""
        if len(self.grad_samples[0]) == 0:
            super().clip_and_accumulate()
            return
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1)
                             for g in self.grad_samples], dim=1).norm(2, dim=1)  # (B,)
        factor = self.clip_factor(norms)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(grad_sample.device, p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


class GhostDPOptimizer(_ClipNoise, DPOptimizerFastGradientClipping):
    """Opacus' fast-gradient-clipping optimizer, stepping a :class:`GhostClippingModule`.

    Its step first has the module compute the per-sample norms, then the weighted
    clipped sum into ``p.grad``; Opacus then accumulates micro-batches, adds the same
    noise and calls the same accountant hook (one step per logical batch).
    """

    def __init__(self, *args: Any, module: GhostClippingModule, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.module = module

    def pre_step(self, closure: Any = None) -> bool | None:
        """Norms and clipped sum (the module), then Opacus' accumulate, noise, scale, accountant."""
        factor = self.clip_factor(self.module.per_sample_norms())
        self.module.backward_clipped(factor, self.params)
        return super().pre_step(closure)


def grad_sample_mode(cfg: FedimgConfig) -> str:
    """``privacy.grad_sample_mode``, or the fastest measured mode of the model (auto)."""
    if cfg.privacy.grad_sample_mode != "auto":
        return cfg.privacy.grad_sample_mode
    return getattr(MODELS.get(cfg.model), "dp_grad_sample_mode", "hooks")


def _declined(ledger: PrivacyLedger, server_round: int, steps: int, reason: str = ""
              ) -> ClientRound:
    if ledger.stopped_round is None:
        ledger.stopped_round = server_round
    reason = reason or (f"privacy budget: epsilon would reach {ledger.epsilon_after(steps):.3f}"
                        f" > {ledger.target_epsilon:g} after this round (spent "
                        f"{ledger.spent():.3f})")
    return ClientRound(metrics={**ledger.report(), "dp/declined": 1.0}, num_examples=0,
                       ledger=ledger.to_dict(), declined=reason)


def train_round(env: ClientEnvironment, partition_id: int, *, server_round: int,
                ledger: dict[str, Any] | None = None, proximal_mu: float = 0.0,
                admit: Admit | None = None, grad_offset: Any = None) -> ClientRound:
    """One DP-SGD round of client ``partition_id`` on ``env`` (a TaskEnvironment).

    The global weights must already be loaded into ``env.model``. Returns the
    metrics (the ``train/*`` ones of a non-private round, plus epsilon, sigma, q,
    delta and the clipped fraction) and the updated ledger; a client whose budget
    cannot cover this round declines. ``admit`` (the site's ledger keeper) sees the
    ledger as it will be after this round, before the first noisy step: it may name a
    reason to decline (a lifetime budget), or write the round ahead to disk.
    ``proximal_mu`` and ``grad_offset`` are ignored: the config refuses FedProx,
    SCAFFOLD and FedDyn under DP-SGD (the noisy per-sample sum drops their loss terms).
    """
    cfg, data = env.cfg, env.client(partition_id)
    n = data.num_train
    labels = env.dataset.train.labels[env.partitions[partition_id].train_indices]
    book = (PrivacyLedger.from_dict(ledger) if ledger
            else client_ledger(cfg, partition_id, labels, env.num_classes))
    steps = steps_per_round(cfg, n)
    if book.stopped_round is not None or book.would_exceed(steps):
        return _declined(book, server_round, steps)
    planned = PrivacyLedger.from_dict(book.to_dict())
    planned.record(steps)
    refused = admit(planned.to_dict()) if admit is not None else ""
    if refused:
        return _declined(book, server_round, steps, refused)
    torch.manual_seed(int(np.random.SeedSequence(
        [cfg.seed, server_round, partition_id, 7]).generate_state(1)[0]))
    lr = scheduled_lr(cfg.train, server_round=server_round, total_rounds=cfg.rounds)
    weights = torch.tensor(book.class_weights) if book.class_weights else None
    model, train = env.private_inputs(partition_id)  # the tail on cached features (issue 16)
    stats = train_private(model, train, book, cfg=cfg, device=env.device,
                          class_weights=weights, lr=lr, steps=steps,
                          generator=noise_generator(cfg, server_round, partition_id))
    return ClientRound(metrics={**stats, "train/lr": lr, **book.report()}, num_examples=n,
                       ledger=book.to_dict())


PrivateModule = GradSampleModule | GhostClippingModule
PrivateOptimizer = WeightedDPOptimizer | GhostDPOptimizer


def make_private(model: nn.Module, *, cfg: FedimgConfig, lr: float, noise_multiplier: float,
                 expected_batch_size: int, device: torch.device,
                 generator: torch.Generator | None = None
                 ) -> tuple[PrivateModule, PrivateOptimizer]:
    """``model`` wrapped for per-sample gradients (or norms), and ``train.optimizer`` made private.

    :class:`DPSGDHook`'s two wrappers, for code that steps them itself (e.g.
    ``bench/dp_overhead.py``): forward, ``loss.backward()``, ``optimizer.step()``;
    ``module._close()`` removes Opacus' hooks from ``model``.
    """
    model.to(device).train()
    module = _grad_sample_module(model, cfg)
    optimizer = _dp_optimizer(build_optimizer(module.parameters(), cfg=cfg.train, lr=lr),
                              module, cfg=cfg, noise_multiplier=noise_multiplier,
                              expected_batch_size=expected_batch_size, generator=generator)
    return module, optimizer


def _grad_sample_module(model: nn.Module, cfg: FedimgConfig) -> PrivateModule:
    """``model`` wrapped for the mode :func:`grad_sample_mode` picks.

    hooks / functorch: Opacus' GradSampleModule (materialised per-sample gradients);
    ghost_mixed: :class:`~fedimg.privacy.norm_samplers.GhostClippingModule` (norms only).
    """
    mode = grad_sample_mode(cfg)
    if mode == "ghost_mixed":
        return GhostClippingModule(model, max_grad_norm=cfg.privacy.max_grad_norm)
    return GradSampleModule(model, batch_first=True, loss_reduction="mean",
                            force_functorch=mode == "functorch")


def _dp_optimizer(optimizer: torch.optim.Optimizer, module: PrivateModule, *,
                  cfg: FedimgConfig, noise_multiplier: float, expected_batch_size: int,
                  generator: torch.Generator | None) -> PrivateOptimizer:
    """``optimizer`` made private for ``module``: clip to C, noise sigma * C, step.

    :class:`WeightedDPOptimizer` over a GradSampleModule, :class:`GhostDPOptimizer`
    over a GhostClippingModule; the same clipping, weights, noise and accounting.
    The loop's loss is a per-micro-batch mean; the noisy sum is divided by the
    *expected* batch size q * N, as the Poisson batch's actual size is private.
    ``privacy.secure_noise`` draws the noise from a fresh :class:`ChaChaStream` instead.
    """
    stream = ChaChaStream() if cfg.privacy.secure_noise else None  # a fresh secret key
    common = dict(noise_multiplier=noise_multiplier, max_grad_norm=cfg.privacy.max_grad_norm,
                  expected_batch_size=max(1, expected_batch_size), loss_reduction="mean",
                  generator=generator, noise_stream=stream)
    if isinstance(module, GhostClippingModule):
        return GhostDPOptimizer(optimizer, module=module, **common)
    return WeightedDPOptimizer(optimizer, **common)


class DPSGDHook:
    """DP-SGD's part in :func:`~fedimg.training.train_local` (a ``StepHook``).

    :meth:`attach` wraps the model in Opacus' GradSampleModule and the round's
    optimizer in :class:`WeightedDPOptimizer` (Abadi et al. 2016, Algorithm 1), or in
    :class:`~fedimg.privacy.norm_samplers.GhostClippingModule` and
    :class:`GhostDPOptimizer` (``ghost_mixed``: same clipping, noise and steps), whose
    accountant continues ``book``'s history; a round that completes writes it back.
    :meth:`micro_batches` is Opacus' BatchMemoryManager split, done on the tensors: b
    samples become ceil(b / physical) near-equal pieces (``np.array_split`` sizes),
    each clipped and accumulated, with noise and the one update after the last
    (``signal_skip_step``); an empty Poisson batch is one empty piece, still a noisy
    step. Class weights, scaled so the largest is 1, are applied after clipping.
    """

    def __init__(self, book: PrivacyLedger, *, cfg: FedimgConfig, expected_batch_size: int,
                 class_weights: torch.Tensor | None, device: torch.device,
                 generator: torch.Generator) -> None:
        self.book, self.cfg, self.generator = book, cfg, generator
        self.expected_batch_size = expected_batch_size
        self.physical = cfg.privacy.physical_batch_size or cfg.train.batch_size
        self.weights = ((class_weights / class_weights.max()).to(device)
                        if class_weights is not None else None)  # (K,) in (0, 1]
        self.optimizer: PrivateOptimizer | None = None  # this round's, once attached

    @contextmanager
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer
               ) -> Iterator[tuple[nn.Module, torch.optim.Optimizer]]:
        """Opacus' wrappers around ``model`` and ``optimizer`` for one round."""
        gsm = _grad_sample_module(model, self.cfg)
        dp = _dp_optimizer(optimizer, gsm, cfg=self.cfg,
                           noise_multiplier=self.book.noise_multiplier,
                           expected_batch_size=self.expected_batch_size,
                           generator=self.generator)
        accountant = create_accountant(mechanism=self.book.accountant)
        accountant.history = list(self.book.history)
        dp.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=self.book.sample_rate))
        self.optimizer = dp
        try:
            yield gsm, dp
        finally:
            dp.zero_grad(set_to_none=True)  # drop the last noisy sum and per-sample gradients
            gsm._close()  # remove Opacus' hooks and per-sample attributes from the shared model
        self.book.history = [tuple(h) for h in accountant.history]

    @property
    def clipped_fraction(self) -> float:
        """The fraction of the round's per-sample gradients that were clipped."""
        seen = self.optimizer.samples_seen if self.optimizer else 0
        return self.optimizer.samples_clipped / seen if self.optimizer and seen else math.nan

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Pieces of at most ``physical`` samples of one logical batch ``x``, ``y`` (b,)."""
        assert self.optimizer is not None, "attach() first"
        pieces = max(1, math.ceil(len(y) / self.physical))
        for i, (xb, yb) in enumerate(zip(x.tensor_split(pieces), y.tensor_split(pieces))):
            self.optimizer.signal_skip_step(do_skip=i < pieces - 1)
            self.optimizer.sample_weights = self.weights[yb] if self.weights is not None else None
            yield xb, yb


def train_private(model: nn.Module, train: InMemoryLoader, book: PrivacyLedger, *,
                  cfg: FedimgConfig, device: torch.device, class_weights: torch.Tensor | None,
                  lr: float, steps: int, generator: torch.Generator) -> dict[str, float]:
    """Train ``model`` (in-place-free, frozen BN) for ``steps`` DP-SGD steps on ``train``.

    :func:`~fedimg.training.train_local` with a :class:`DPSGDHook`, over Poisson
    batches of ``train``'s partition (``generator`` draws them and the noise; ChaCha20
    with ``privacy.secure_noise``); ``book``'s
    history is continued in place. Returns :meth:`~fedimg.training.TrainResult.as_metrics`
    (the same meaning as without DP), ``train/samples`` and ``dp/clipped_fraction``.
    """
    num_train = train.num_examples
    tcfg, per_pass = _round_plan(cfg.train, steps=steps,
                                 per_epoch=max(1, num_train // cfg.train.batch_size))
    hook = DPSGDHook(book, cfg=cfg, expected_batch_size=round(book.sample_rate * num_train),
                     class_weights=class_weights, device=device, generator=generator)
    loader = private_batches(train, rate=book.sample_rate, steps=per_pass, generator=generator,
                             poisson=cfg.privacy.poisson, secure=cfg.privacy.secure_noise)
    result = train_local(model, loader, cfg=tcfg, lr=lr, device=device, hook=hook,
                         class_weights=None if class_weights is None else class_weights.float())
    return {**result.as_metrics(), "train/samples": float(result.num_examples),
            "dp/clipped_fraction": hook.clipped_fraction}


def _round_plan(cfg: TrainConfig, *, steps: int, per_epoch: int) -> tuple[TrainConfig, int]:
    """The TrainConfig and Poisson batches per pass with which train_local takes ``steps``.

    ``local_epochs`` passes of ``per_epoch`` (~1/q) batches when that is ``steps``, so
    first/last loss average one epoch as without DP; else one pass of ``steps``. No
    autocast or channels_last: a float16 GradScaler would scale gradients before clipping.
    """
    cfg = dataclasses.replace(cfg, amp=False, channels_last=False)
    if (cfg.local_budget == "epochs" and cfg.local_steps is None
            and steps == cfg.local_epochs * per_epoch):
        return cfg, per_epoch
    return dataclasses.replace(cfg, local_steps=steps), steps
