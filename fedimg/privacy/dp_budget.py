"""A DP-SGD client's budget: sampling rate, steps, the calibrated ledger, its noise source.

Sigma is calibrated once per client from its whole planned participation (all rounds
x local steps; Abadi et al. 2016), so the final epsilon meets the budget. With
``train.class_weighting=balanced`` the client first releases its label counts with
Gaussian noise (an accounted mechanism that opens the ledger's history). A ledger a
resumed server hands back is checked against what the client can recompute.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedimg.config import FedimgConfig
from fedimg.errors import UpdateError
from fedimg.privacy.accounting import PrivacyLedger, default_delta, new_ledger
from fedimg.privacy.protocols import ClientEnvironment
from fedimg.privacy.secure_noise import ChaChaStream
from fedimg.training.budget import round_steps
from fedimg.training.losses import balanced_weights_from_counts

log = logging.getLogger(__name__)

# A site's check of the ledger as it will be after a round: "" to train, else why not.
Admit = Callable[[dict[str, Any]], str]


def sample_rate(cfg: FedimgConfig, num_samples: int) -> float:
    """Poisson sampling rate q = B / N (expected logical batch B = train.batch_size)."""
    return min(1.0, cfg.train.batch_size / max(1, num_samples))


def steps_per_round(cfg: FedimgConfig, num_samples: int) -> int:
    """Noisy steps in one round (``train.local_budget``): ``local_steps``, else
    ``local_epochs`` x 1/q, or ``ceil(steps_per_sample x num_samples)``."""
    per_epoch = max(1, num_samples // cfg.train.batch_size)  # ~1/q Poisson batches
    return round_steps(cfg.train, batches=per_epoch, num_samples=num_samples)


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
        noise = (ChaChaStream().normal(num_classes, std=p.count_noise) if p.secure_noise
                 else torch.randn(num_classes, generator=noise_generator(cfg, partition_id, 0),
                                  dtype=torch.float64) * p.count_noise)
        weights = balanced_weights_from_counts((counts + noise).clamp(min=1.0)).tolist()
        prefix = [(p.count_noise, 1.0, 1)]
    book = new_ledger(target_epsilon=budget, delta=p.target_delta or default_delta(n),
                      sample_rate=sample_rate(cfg, n),
                      planned_steps=cfg.rounds * steps_per_round(cfg, n),
                      accountant=p.accountant, noise_multiplier=p.noise_multiplier,
                      prefix=prefix)
    book.class_weights = weights
    return book


def adopted_ledger(env: ClientEnvironment, partition_id: int,
                   offered: dict[str, Any]) -> dict[str, Any]:
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
