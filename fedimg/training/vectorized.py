"""Many small clients' local rounds in one vectorised step (``torch.func.vmap``).

A simulated camera holds a few batches; training k of them one after another runs k
small forward/backward passes that leave a GPU (or even a CPU core) idle between
kernels. :func:`train_vectorized` trains all k together: every trainable parameter,
every BatchNorm statistic that trains and every momentum buffer is stacked on a new
leading client axis, the forward and loss run through
``torch.func.functional_call`` under ``torch.func.vmap(torch.func.grad(...))``, and
SGD updates each client's slice (the "model ensembling" recipe of the ``torch.func``
docs; vmap itself: JAX, Bradbury et al. 2018).

**Equal to sequential training.** Each client's result equals
:func:`~fedimg.training.loop.train_local` run alone from the same weights and seed
(``torch.manual_seed(job.seed)`` just before it, as the client environment does),
to float tolerance: the same batches in the same order (each client iterates its own
loader, cycling for ``local_steps``), the same loss (``sum of (class-weighted)
cross-entropies / batch size`` on FedRS-scaled, FedLC-shifted logits, plus the
FedProx term ``mu / 2 * ||w - w_global||^2`` of Li et al. 2020), the same SGD (heavy-ball
momentum, L2 weight decay added to the gradient, a fresh buffer each round: a zero
buffer gives the same first step), and BatchNorm in train mode updating each
client's own running statistics (stacked buffers, mutated in place under vmap).
Random layers (dropout, stochastic depth) and the loader's own draws replay each
client's generator stream (:mod:`fedimg.training.random_lanes`). Frozen parameters
and frozen BatchNorm are shared, not stacked.

**Different step counts and batch sizes.** At each step the active clients (those
with steps left) are grouped by batch shape; each group is one vmapped step. A
client with fewer steps drops out of later steps; a short last batch forms its own
group. Masking a padded batch would be cheaper but wrong under train-mode BatchNorm.

**Eligibility** (:func:`refusal` gives the reason, or None): SGD only (not AdamW);
no :class:`~fedimg.training.loop.StepHook` (DP-SGD clips per sample and adds noise
per client: train those sequentially); no float16 autocast (its GradScaler is per
client); every job has a seed; random layers only of the supported kinds. The
caller trains ineligible cohorts one after another (:func:`train_clients`).

``TrainResult.seconds`` is the cohort's wall time divided by k (a client's share).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedimg.config import TrainConfig
from fedimg.errors import ConfigError
from fedimg.training.device import amp_dtype, autocast
from fedimg.training.loop import (
    Loader,
    StepHook,
    TrainResult,
    _check_finite,
    _count_steps,
    _cycle,
    _summarise,
    _window,
    train_local,
)
from fedimg.training.random_lanes import Lanes, RandomLayers, unsupported_random_layers

logger = logging.getLogger(__name__)

_CHECK_EVERY = 10  # as train_local: look for a non-finite loss every this many steps


class VectorizeRefused(ConfigError):
    """These clients cannot be trained together; the message says why (train them in turn)."""


@dataclass(frozen=True)
class ClientJob:
    """One client of a cohort: its loader and what :func:`train_local` would get."""

    loader: Loader
    seed: int  # torch.manual_seed before its round (fedimg.seeds.derive_seed)
    class_weights: torch.Tensor | None = None  # (K,)
    logit_scale: torch.Tensor | None = None  # (K,) FedRS
    logit_shift: torch.Tensor | None = None  # (K,) FedLC


@dataclass(frozen=True)
class ClientOutcome:
    """What one client's round did, and its trained tensors under state-dict names."""

    result: TrainResult
    state: dict[str, torch.Tensor]  # trainable parameters and trained BatchNorm buffers


def refusal(model: nn.Module, *, cfg: TrainConfig, device: torch.device,
            hook: StepHook | None = None) -> str | None:
    """Why ``model`` under ``cfg`` cannot train vectorised (one line), or None if it can."""
    if hook is not None:
        return "a step hook (DP-SGD) clips and noises per client; trained one by one"
    if cfg.optimizer != "sgd":
        return f"train.optimizer={cfg.optimizer} is not vectorised (sgd only)"
    if amp_dtype(device, enabled=cfg.amp) is torch.float16:
        return "float16 autocast needs a GradScaler per client; use bfloat16 or amp off"
    unsupported = unsupported_random_layers(model)
    if unsupported:
        return f"random layers {', '.join(unsupported[:3])} cannot be replayed per client"
    if not any(p.requires_grad for p in model.parameters()):
        return "the model has no trainable parameter"
    return None


def stacked_buffer_names(model: nn.Module) -> list[str]:
    """Buffers that train-mode training changes: the running statistics of BatchNorm."""
    return [f"{name}.{b}" if name else b
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for b, value in module.named_buffers(recurse=False) if value is not None]


def train_vectorized(model: nn.Module, jobs: Sequence[ClientJob], *, cfg: TrainConfig,
                     lr: float, device: torch.device,
                     proximal_mu: float = 0.0) -> list[ClientOutcome]:
    """Train every job from ``model``'s weights at once; ``model`` itself is not changed.

    Raises :class:`VectorizeRefused` for an ineligible config (see :func:`refusal`),
    :class:`~fedimg.errors.TrainingDiverged` when a client's loss stops being finite.
    """
    reason = refusal(model, cfg=cfg, device=device)
    if reason is not None:
        raise VectorizeRefused(f"cannot train {len(jobs)} clients vectorised: {reason}")
    model.to(device).train()
    engine = _Engine.build(model, jobs, cfg=cfg, lr=lr, device=device, mu=proximal_mu)
    lanes = Lanes([job.seed for job in jobs], device=device)
    start = time.perf_counter()
    with lanes.preserved(), engine.layers.replayed() as feed:
        engine.feed = feed
        for t in range(max(engine.steps)):
            engine.step(t, lanes)
    seconds = (time.perf_counter() - start) / len(jobs)
    return [engine.outcome(i, seconds=seconds) for i in range(len(jobs))]


def train_sequential(model: nn.Module, jobs: Sequence[ClientJob], *, cfg: TrainConfig,
                     lr: float, device: torch.device,
                     proximal_mu: float = 0.0) -> list[ClientOutcome]:
    """The reference: :func:`train_local` for each job in turn, each from ``model``'s
    weights and ``torch.manual_seed(job.seed)``; ``model`` is restored afterwards."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = [n for n, p in model.named_parameters() if p.requires_grad]
    keys += stacked_buffer_names(model)
    outcomes = []
    try:
        for job in jobs:
            model.load_state_dict(initial)
            torch.manual_seed(job.seed)
            result = train_local(model, job.loader, cfg=cfg, lr=lr, device=device,
                                 proximal_mu=proximal_mu, class_weights=job.class_weights,
                                 logit_scale=job.logit_scale, logit_shift=job.logit_shift)
            state = model.state_dict()
            outcomes.append(ClientOutcome(result, {k: state[k].detach().clone() for k in keys}))
    finally:
        model.load_state_dict(initial)
    return outcomes


# --- the engine -----------------------------------------------------------------------


@dataclass
class _Client:
    """One client's loop state: batches, step losses and sizes, correct predictions."""

    batches: object  # iterator over its (x, y) batches
    losses: torch.Tensor  # (T_i,) on the device
    sizes: torch.Tensor  # (T_i,) long, on the CPU
    correct: torch.Tensor  # () long, on the device
    window: int


@dataclass
class _Engine:
    """Stacked tensors (client axis first) and the vmapped step over groups of clients."""

    model: nn.Module
    params: dict[str, torch.Tensor]  # (k, ...) trainable parameters
    buffers: dict[str, torch.Tensor]  # (k, ...) trained BatchNorm buffers
    momenta: dict[str, torch.Tensor]  # (k, ...) SGD momentum buffers
    anchors: dict[str, torch.Tensor] | None  # global weights (FedProx), shared
    weights: torch.Tensor | None  # (k, K) class weights
    scales: torch.Tensor | None  # (k, K) FedRS logit scale
    shifts: torch.Tensor | None  # (k, K) FedLC logit shift
    clients: list[_Client]
    steps: list[int]
    cfg: TrainConfig
    lr: float
    mu: float
    device: torch.device
    layers: RandomLayers
    feed: list[torch.Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module, jobs: Sequence[ClientJob], *, cfg: TrainConfig,
              lr: float, device: torch.device, mu: float) -> _Engine:
        k = len(jobs)
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        named_buffers = dict(model.named_buffers())
        stacked = {n: named_buffers[n].detach() for n in stacked_buffer_names(model)}

        def stack(t: torch.Tensor) -> torch.Tensor:  # (...) -> (k, ...), a copy per client
            return t.unsqueeze(0).repeat(k, *[1] * t.dim()).contiguous()

        steps = [_count_steps(job.loader, cfg) for job in jobs]
        clients = [_Client(batches=_cycle(job.loader, n),
                           losses=torch.zeros(n, device=device),
                           sizes=torch.zeros(n, dtype=torch.long),
                           correct=torch.zeros((), dtype=torch.long, device=device),
                           window=_window(job.loader, cfg, n))
                   for job, n in zip(jobs, steps)]
        return cls(
            model=model, params={n: stack(p) for n, p in trainable.items()},
            buffers={n: stack(b) for n, b in stacked.items()},
            momenta={n: torch.zeros((k, *p.shape), dtype=p.dtype, device=device)
                     for n, p in trainable.items()},
            anchors=dict(trainable) if mu > 0 else None,
            weights=_stack_optional([j.class_weights for j in jobs], device),
            scales=_stack_optional([j.logit_scale for j in jobs], device),
            shifts=_stack_optional([j.logit_shift for j in jobs], device),
            clients=clients, steps=steps, cfg=cfg, lr=lr, mu=mu, device=device,
            layers=RandomLayers(model, device, amp_dtype(device, enabled=cfg.amp)))

    def step(self, t: int, lanes: Lanes) -> None:
        """Step ``t`` of every client that has one: fetch in its lane, then per shape group."""
        fetched: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}
        for i, client in enumerate(self.clients):
            if t < self.steps[i]:
                with lanes.lane(i):
                    x, y = next(client.batches)  # type: ignore[call-overload]
                    x, y = x.to(self.device), y.to(self.device)  # (b, C, S, S), (b,)
                    noise = self.layers.draw(len(y), tuple(x.shape[1:]))
                fetched[i] = (x, y, noise)
        groups: dict[tuple, list[int]] = {}
        for i, (x, y, _) in fetched.items():
            groups.setdefault((tuple(x.shape), tuple(y.shape)), []).append(i)
        for members in groups.values():
            self._group_step(t, members, fetched)
        for i in fetched:
            if (t + 1) % _CHECK_EVERY == 0 or t + 1 == self.steps[i]:
                _check_finite(self.clients[i].losses[: t + 1], lr=self.lr)

    def _group_step(self, t: int, members: list[int],
                    fetched: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]
                    ) -> None:
        """One vmapped forward, loss, gradient and SGD update of ``members``."""
        whole = members == list(range(len(self.clients)))
        index = torch.tensor(members, device=self.device)

        def take(stack: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return stack if whole else {n: v.index_select(0, index) for n, v in stack.items()}

        params, buffers, momenta = take(self.params), take(self.buffers), take(self.momenta)
        x = torch.stack([fetched[i][0] for i in members])  # (g, b, C, S, S)
        y = torch.stack([fetched[i][1] for i in members])  # (g, b)
        noise = [torch.stack(n) for n in zip(*(fetched[i][2] for i in members))]
        weights = None if self.weights is None else self.weights[index]
        scales = None if self.scales is None else self.scales[index]
        shifts = None if self.shifts is None else self.shifts[index]
        with autocast(self.device, amp_dtype(self.device, enabled=self.cfg.amp)):
            dims = (0, 0, 0, 0, 0, *(None if t is None else 0 for t in (weights, scales, shifts)))
            grads, (summed, logits) = vmap(grad(self._objective, has_aux=True), in_dims=dims)(
                params, buffers, x, y, noise, weights, scales, shifts)
        new_params, new_momenta = _sgd(params, grads, momenta, cfg=self.cfg, lr=self.lr)
        for n in params:
            if whole:
                self.params[n], self.momenta[n] = new_params[n], new_momenta[n]
            else:
                self.params[n].index_copy_(0, index, new_params[n])
                self.momenta[n].index_copy_(0, index, new_momenta[n])
        if not whole:  # the gathered BatchNorm statistics were updated in place
            for n, value in buffers.items():
                self.buffers[n].index_copy_(0, index, value)
        correct = (logits.argmax(dim=-1) == y).sum(dim=1)  # (g,)
        for j, i in enumerate(members):
            client = self.clients[i]
            client.losses[t] = summed[j].float() / max(y.shape[1], 1)
            client.sizes[t] = y.shape[1]
            client.correct += correct[j]

    def _objective(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor, noise: list[torch.Tensor],
                   weight: torch.Tensor | None, scale: torch.Tensor | None,
                   shift: torch.Tensor | None
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One client's step objective (vmapped): loss (+ FedProx) and (loss sum, logits)."""
        self.feed.extend(noise)  # type: ignore[union-attr]
        logits = functional_call(self.model, (params, buffers), (x,))  # (b, K)
        if scale is not None:
            logits = logits * scale
        if shift is not None:
            logits = logits + shift
        summed = F.cross_entropy(logits, y, weight=weight, reduction="sum")
        objective = summed / max(y.shape[0], 1)
        if self.anchors is not None:
            distance = sum(((params[n] - a) ** 2).sum() for n, a in self.anchors.items())
            objective = objective + self.mu / 2 * distance
        return objective, (summed.detach(), logits.detach())

    def outcome(self, i: int, *, seconds: float) -> ClientOutcome:
        """Client ``i``'s summary (as :func:`train_local` reports it) and its tensors."""
        c = self.clients[i]
        result = _summarise(c.losses.float().cpu(), c.sizes, correct=int(c.correct),
                            window=c.window, seconds=seconds)
        state = {n: v[i].clone() for n, v in {**self.params, **self.buffers}.items()}
        return ClientOutcome(result, state)


def _stack_optional(values: list[torch.Tensor | None],
                    device: torch.device) -> torch.Tensor | None:
    """(k, K) of the per-client vectors; ones where a client has none; None if none has."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    ones = torch.ones_like(present[0])
    return torch.stack([(v if v is not None else ones) for v in values]).to(device)


def _sgd(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
         momenta: dict[str, torch.Tensor], *, cfg: TrainConfig,
         lr: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``torch.optim.SGD`` (momentum, dampening 0, no Nesterov, L2 decay), per slice.

    ``d = g + wd * w``; ``m = momentum * m + d``; ``w = w - lr * m``. A zero initial
    buffer gives ``m = d`` on the first step, as SGD's fresh buffer does.
    """
    new_params, new_momenta = {}, {}
    for n, p in params.items():
        d = grads[n] if cfg.weight_decay == 0 else grads[n].add(p, alpha=cfg.weight_decay)
        m = momenta[n].mul(cfg.momentum).add_(d) if cfg.momentum != 0 else d
        new_params[n], new_momenta[n] = p.add(m, alpha=-lr), m
    return new_params, new_momenta

