"""Sample-level DP-SGD for one client round, with Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", CCS): every
logical batch is drawn by Poisson sampling with rate q = B / N, each per-sample
gradient is clipped to ``max_grad_norm`` C, and Gaussian noise N(0, sigma^2 C^2)
is added to their sum. Opacus provides the pieces used here: ``GradSampleModule``
(per-sample gradients; hooks mode with fedimg's grouped Conv2d rule, see
:mod:`fedimg.privacy.grad_samplers`, or functorch), ``DPOptimizer`` (clip, noise,
step), ``UniformWithReplacementSampler`` (Poisson batches), ``BatchMemoryManager``
(physical batches below the logical batch) and the PRV/RDP accountants. The model is
the client's pretrained network with frozen BatchNorm and its in-place operations
rewritten (Opacus' hooks cannot see through them).

Sigma is calibrated once per client from its whole planned participation (all
rounds x local steps); the client's :class:`~fedimg.privacy.accounting.PrivacyLedger`
travels between rounds in Flower's ``context.state``, and the accountant attached to
the optimizer continues that history, so epsilon accumulates. A client whose next
round would exceed its budget declines that round and every later one. Class weights
come from a noisy (accounted) release of the label counts and are applied after
clipping. Noise and batches are drawn from a secret source unless
``privacy.seeded_noise`` is set.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedimg.config import FedimgConfig
from fedimg.data import InMemoryLoader
from fedimg.errors import TrainingDiverged, UpdateError
from fedimg.models import MODELS
from fedimg.privacy import ClientRound, grad_samplers  # noqa: F401 - registers Conv2d rule
from fedimg.privacy.accounting import PrivacyLedger, default_delta, new_ledger
from fedimg.training import build_optimizer, scheduled_lr
from fedimg.training.losses import balanced_weights_from_counts

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="Optimal order is the", module="opacus")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")


class WeightedDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with per-sample weights applied after clipping, and clip counts.

    Weighting the loss (e.g. by inverse class frequency) is undone by clipping: every
    clipped gradient ends up with norm C whatever its weight. Here each per-sample
    gradient is clipped to C first and then scaled by its weight in [0, 1], so every
    sample still contributes at most C and the Gaussian mechanism, its noise and its
    accounting are unchanged. Set :attr:`sample_weights` (B,) before each ``step()``;
    None means weight 1. It also counts the per-sample gradients that were clipped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples_seen = 0
        self.samples_clipped = 0
        self.sample_weights: torch.Tensor | None = None

    def clip_and_accumulate(self) -> None:
        """Opacus' clip-and-sum (opacus/optimizers/optimizer.py), with weights and counts."""
        if len(self.grad_samples[0]) == 0:
            super().clip_and_accumulate()
            return
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1)
                             for g in self.grad_samples], dim=1).norm(2, dim=1)  # (B,)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        self.samples_seen += len(norms)
        self.samples_clipped += int((norms > self.max_grad_norm).sum())
        if self.sample_weights is not None:
            factor = factor * self.sample_weights.to(factor)
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor.to(grad_sample.device, p.dtype), grad_sample)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


class _Positions(Dataset):
    """Positions 0..n-1 into a client's partition (the batch is gathered in collate)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def sample_rate(cfg: FedimgConfig, num_samples: int) -> float:
    """Poisson sampling rate q = B / N (expected logical batch B = train.batch_size)."""
    return min(1.0, cfg.train.batch_size / max(1, num_samples))


def steps_per_round(cfg: FedimgConfig, num_samples: int) -> int:
    """Noisy steps in one round: ``local_steps``, else ``local_epochs`` x 1/q."""
    if cfg.train.local_steps is not None:
        return cfg.train.local_steps
    return cfg.train.local_epochs * max(1, num_samples // cfg.train.batch_size)


def client_ledger(cfg: FedimgConfig, partition_id: int, labels: torch.Tensor,
                  num_classes: int) -> PrivacyLedger:
    """The first-round ledger: budget, delta and sigma calibrated for all planned rounds.

    With ``train.class_weighting=balanced`` the client first releases its label
    counts with Gaussian noise (sigma = ``privacy.count_noise``, sensitivity 1 under
    add/remove); that release opens the ledger's history and the weights come from it,
    so they cost budget instead of leaking the exact counts.
    """
    p, n = cfg.privacy, len(labels)
    if not p.poisson:
        log.warning("client %d: privacy.poisson=false draws shuffled fixed-size batches; the "
                    "reported epsilon assumes Poisson sampling and is only approximate",
                    partition_id)
    budget = p.client_epsilons[partition_id] if p.client_epsilons else p.target_epsilon
    prefix, weights = [], None
    if cfg.train.class_weighting == "balanced":
        counts = torch.bincount(labels, minlength=num_classes).double()
        noise = torch.randn(num_classes, generator=noise_generator(cfg, partition_id, 0),
                            dtype=torch.float64) * p.count_noise
        weights = balanced_weights_from_counts((counts + noise).clamp(min=1.0)).tolist()
        prefix = [(p.count_noise, 1.0, 1)]
    book = new_ledger(target_epsilon=budget, delta=p.target_delta or default_delta(n),
                      sample_rate=sample_rate(cfg, n),
                      planned_steps=cfg.rounds * steps_per_round(cfg, n),
                      accountant=p.accountant, noise_multiplier=p.noise_multiplier,
                      prefix=prefix)
    book.class_weights = weights
    return book


def adopted_ledger(env: Any, partition_id: int, offered: dict[str, Any]) -> dict[str, Any]:
    """A ledger the server hands back after a resume, checked against this client's config.

    The client can recompute everything but the history: budget, delta, q and sigma
    must equal its own calibration, the history must only contain valid mechanisms,
    and class weights must be positive (a negative weight would scale a clipped
    gradient beyond C). The history itself is trusted: a server that omits entries
    makes epsilon under-count, which only a ledger the client stores itself prevents.
    """
    cfg = env.cfg
    labels = env.dataset.train.labels[env.partitions[partition_id].train_indices]
    own = client_ledger(cfg, partition_id, labels, env.num_classes)
    book = PrivacyLedger.from_dict(offered)
    same = (book.target_epsilon, book.delta, book.sample_rate, book.accountant) == \
        (own.target_epsilon, own.delta, own.sample_rate, own.accountant) and \
        math.isclose(book.noise_multiplier, own.noise_multiplier, rel_tol=1e-9)
    history_ok = all(sigma > 0 and 0 < q <= 1 and int(steps) >= 0
                     for sigma, q, steps in book.history) and \
        book.history[:len(own.history)] == own.history
    weights = book.class_weights
    weights_ok = (weights is None) == (own.class_weights is None) and (
        weights is None or (len(weights) == env.num_classes
                            and all(math.isfinite(w) and w > 0 for w in weights)))
    if not (same and history_ok and weights_ok):
        raise UpdateError(f"client {partition_id}: the privacy ledger the server handed back "
                          "does not match this client's privacy config; refusing to train")
    return book.to_dict()


def noise_generator(cfg: FedimgConfig, *salt: int) -> torch.Generator:
    """The generator of DP noise and sampling: secret unless ``privacy.seeded_noise``.

    Noise drawn from the run seed could be regenerated, and subtracted, by anyone who
    reads the config; only tests and reproducibility studies should seed it.
    """
    if cfg.privacy.seeded_noise:
        seed = int(np.random.SeedSequence([cfg.seed, *salt]).generate_state(1)[0])
    else:
        seed = secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def grad_sample_mode(cfg: FedimgConfig) -> str:
    """``privacy.grad_sample_mode``, or the fastest measured mode of the model (auto)."""
    if cfg.privacy.grad_sample_mode != "auto":
        return cfg.privacy.grad_sample_mode
    return getattr(MODELS.get(cfg.model), "dp_grad_sample_mode", "hooks")


class ShuffledBatches:
    """``steps`` fixed-size batches of positions, reshuffled every pass (no Poisson)."""

    def __init__(self, n: int, batch_size: int, steps: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.steps, self.generator = n, min(batch_size, n), steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        order: list[int] = []
        for _ in range(self.steps):
            if len(order) < self.batch_size:
                order = torch.randperm(self.n, generator=self.generator).tolist()
            batch, order = order[:self.batch_size], order[self.batch_size:]
            yield batch


def private_batches(loader: InMemoryLoader, *, rate: float, steps: int,
                    generator: torch.Generator, poisson: bool = True) -> DataLoader:
    """``steps`` logical batches over ``loader``'s partition (same transform).

    Poisson sampling (each sample independently with probability ``rate``) is what
    the accountants assume; ``poisson=False`` draws shuffled batches of the expected
    size instead, for which the reported epsilon is only the usual approximation.
    """
    images, labels, indices = loader.images, loader.labels, loader.indices
    empty_x = loader.transform(images[torch.from_numpy(indices[:1])])[:0]  # (0, C, S, S)

    def collate(positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not positions:
            return empty_x, labels[:0]
        idx = torch.from_numpy(indices[np.asarray(positions)])
        return loader.transform(images[idx]), labels[idx]

    if poisson:
        sampler: Any = UniformWithReplacementSampler(num_samples=len(indices), sample_rate=rate,
                                                     generator=generator, steps=steps)
    else:
        sampler = ShuffledBatches(len(indices), max(1, round(rate * len(indices))), steps,
                                  generator)
    return DataLoader(_Positions(len(indices)), batch_sampler=sampler, collate_fn=collate)


def _declined(ledger: PrivacyLedger, server_round: int, steps: int) -> ClientRound:
    if ledger.stopped_round is None:
        ledger.stopped_round = server_round
    reason = (f"privacy budget: epsilon would reach {ledger.epsilon_after(steps):.3f} > "
              f"{ledger.target_epsilon:g} after this round (spent {ledger.spent():.3f})")
    return ClientRound(metrics={**ledger.report(), "dp/declined": 1.0}, num_examples=0,
                       ledger=ledger.to_dict(), declined=reason)


def train_round(env: Any, partition_id: int, *, server_round: int,
                ledger: dict[str, Any] | None = None, proximal_mu: float = 0.0) -> ClientRound:
    """One DP-SGD round of client ``partition_id`` on ``env`` (a TaskEnvironment).

    The global weights must already be loaded into ``env.model``. Returns the
    metrics (with epsilon, sigma, q, delta and the clipped fraction) and the
    updated ledger; a client whose budget cannot cover this round declines.
    """
    cfg, data = env.cfg, env.client(partition_id)
    n = data.num_train
    labels = env.dataset.train.labels[env.partitions[partition_id].train_indices]
    book = (PrivacyLedger.from_dict(ledger) if ledger
            else client_ledger(cfg, partition_id, labels, env.num_classes))
    steps = steps_per_round(cfg, n)
    if book.stopped_round is not None or book.would_exceed(steps):
        return _declined(book, server_round, steps)
    torch.manual_seed(int(np.random.SeedSequence(
        [cfg.seed, server_round, partition_id, 7]).generate_state(1)[0]))
    lr = scheduled_lr(cfg.train, server_round=server_round, total_rounds=cfg.rounds)
    started = time.perf_counter()
    weights = torch.tensor(book.class_weights) if book.class_weights else None
    stats = train_private(env.private_model(), data.train, book, cfg=cfg, device=env.device,
                          class_weights=weights, lr=lr, steps=steps,
                          generator=noise_generator(cfg, server_round, partition_id))
    stats["train/seconds"] = time.perf_counter() - started
    stats["train/lr"] = lr
    return ClientRound(metrics={**stats, **book.report()}, num_examples=n,
                       ledger=book.to_dict())


def make_private(model: nn.Module, *, cfg: FedimgConfig, lr: float, noise_multiplier: float,
                 expected_batch_size: int, device: torch.device,
                 generator: torch.Generator | None = None
                 ) -> tuple[GradSampleModule, WeightedDPOptimizer]:
    """``model`` wrapped for per-sample gradients, and the clipping, noising optimizer.

    The grad-sample mode is :func:`grad_sample_mode`; the optimizer is
    ``train.optimizer`` inside Opacus' DPOptimizer. Close the module with
    ``gsm._close()`` to remove Opacus' hooks from ``model`` again.
    """
    model.to(device).train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean",
                           force_functorch=grad_sample_mode(cfg) == "functorch")
    trainable = [p for p in gsm.parameters() if p.requires_grad]
    optimizer = WeightedDPOptimizer(
        build_optimizer(trainable, cfg=cfg.train, lr=lr), noise_multiplier=noise_multiplier,
        max_grad_norm=cfg.privacy.max_grad_norm,
        expected_batch_size=max(1, expected_batch_size), loss_reduction="mean",
        generator=generator)
    return gsm, optimizer


def train_private(model: nn.Module, train: InMemoryLoader, book: PrivacyLedger, *,
                  cfg: FedimgConfig, device: torch.device, class_weights: torch.Tensor | None,
                  lr: float, steps: int, generator: torch.Generator) -> dict[str, float]:
    """Train ``model`` (in-place-free, frozen BN) for ``steps`` DP-SGD steps on ``train``.

    Wraps the model for Opacus, continues ``book``'s accountant history (updated in
    place), and unwraps the model again afterwards. ``generator`` draws the Poisson
    batches and the noise.
    """
    num_train = train.num_examples
    gsm, optimizer = make_private(model, cfg=cfg, lr=lr, noise_multiplier=book.noise_multiplier,
                                  expected_batch_size=round(book.sample_rate * num_train),
                                  device=device, generator=generator)
    accountant = create_accountant(mechanism=book.accountant)
    accountant.history = list(book.history)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=book.sample_rate))
    loader = private_batches(train, rate=book.sample_rate, steps=steps, generator=generator,
                             poisson=cfg.privacy.poisson)
    physical = cfg.privacy.physical_batch_size or cfg.train.batch_size
    try:
        stats = _loop(gsm, loader, optimizer, physical=physical, device=device,
                      class_weights=class_weights, lr=lr)
    finally:
        gsm._close()  # remove Opacus' hooks and per-sample attributes from the shared model
    book.history = [tuple(h) for h in accountant.history]
    stats["train/steps"] = float(steps)
    stats["dp/clipped_fraction"] = (optimizer.samples_clipped / optimizer.samples_seen
                                    if optimizer.samples_seen else math.nan)
    return stats


def _loop(model: nn.Module, loader: DataLoader, optimizer: WeightedDPOptimizer, *,
          physical: int,
          device: torch.device, class_weights: torch.Tensor | None,
          lr: float) -> dict[str, float]:
    """Physical-batch loop under BatchMemoryManager; returns loss/accuracy summaries.

    Class weights are applied after clipping (:class:`WeightedDPOptimizer`), scaled so
    that the largest is 1; the reported loss is the plain cross-entropy.
    """
    weight = (class_weights / class_weights.max()).to(device) \
        if class_weights is not None else None
    losses, sizes, correct = [], [], 0
    optimizer.zero_grad(set_to_none=True)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical,
                            optimizer=optimizer) as batches:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)  # (b, K)
            loss = F.cross_entropy(logits, y, reduction="sum") / max(len(y), 1)
            loss.backward()
            optimizer.sample_weights = weight[y] if weight is not None else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            sizes.append(len(y))
            correct += int((logits.argmax(1) == y).sum())
    loss_arr, size_arr = np.asarray(losses), np.asarray(sizes, dtype=np.float64)
    if not np.isfinite(loss_arr).all():
        raise TrainingDiverged(f"DP-SGD loss became {loss_arr[~np.isfinite(loss_arr)][0]} "
                               f"with lr={lr:g}; fix: lower train.lr")
    total = size_arr.sum()
    k = max(1, math.ceil(0.1 * len(losses)))
    return {"train/loss": float((loss_arr * size_arr).sum() / total) if total else math.nan,
            "train/accuracy": correct / total if total else math.nan,
            "train/first_loss": _mean(loss_arr[:k], size_arr[:k]),
            "train/last_loss": _mean(loss_arr[-k:], size_arr[-k:]),
            "train/samples": float(total)}


def _mean(values: np.ndarray, weights: np.ndarray) -> float:
    return float((values * weights).sum() / weights.sum()) if weights.sum() else math.nan
