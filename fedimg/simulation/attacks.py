"""Simulated Byzantine clients, to measure robust aggregation (plain PyTorch).

``attack.byzantine_fraction`` turns a fixed, seeded set of clients malicious;
``attack.kind`` picks what they do from :data:`ATTACKS`:

* ``sign_flip``: send w_g - s * (w_i - w_g), the honest update reversed and scaled
  (the sign-flipping attack of Li et al. 2019, "RSA: Byzantine-Robust Stochastic
  Aggregation Methods for Distributed Learning from Heterogeneous Datasets", AAAI).
* ``scale``: send w_g + s * (w_i - w_g), a boosted update (Bhagoji et al. 2019,
  "Analyzing Federated Learning through an Adversarial Lens", ICML).
* ``label_flip``: train honestly on flipped labels y -> C - 1 - y (data poisoning,
  Biggio et al. 2012; Tolpegin et al. 2020 for federated learning).

Only trained floating-point parameters are poisoned: BatchNorm statistics and
frozen weights are sent unchanged, as a careful attacker would, so the attack is
not caught by the server's sanity checks and robust aggregation is what is measured.

Injected crashes (chaos testing) are :mod:`fedimg.simulation.faults`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from fedimg.config import FedimgConfig
from fedimg.registry import Registry
from fedimg.seeds import derive_rng

LabelPoison = Callable[[torch.Tensor, int], torch.Tensor]
UpdatePoison = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class Attack:
    """What a malicious client does: to its labels before training, or to its update."""

    description: str
    poison_labels: LabelPoison | None = None
    poison_update: UpdatePoison | None = None  # (global, local, scale) -> sent tensor


ATTACKS: Registry[Attack] = Registry("attack", config_key="attack.kind")

ATTACKS.add("sign_flip", Attack(
    "send the reversed update, scaled: w_g - s (w_i - w_g)",
    poison_update=lambda g, w, s: g - s * (w - g)))
ATTACKS.add("scale", Attack(
    "send a boosted update: w_g + s (w_i - w_g)",
    poison_update=lambda g, w, s: g + s * (w - g)))
ATTACKS.add("label_flip", Attack(
    "train on flipped labels y -> C - 1 - y",
    poison_labels=lambda y, num_classes: (num_classes - 1) - y))


def malicious_clients(cfg: FedimgConfig) -> frozenset[int]:
    """The partition ids of the Byzantine clients: round(fraction x clients), seeded."""
    count = int(round(cfg.attack.byzantine_fraction * cfg.clients))
    if count == 0:
        return frozenset()
    rng = derive_rng(cfg.seed, 0xB12)
    return frozenset(int(i) for i in rng.choice(cfg.clients, size=count, replace=False))


def poisoned_labels(cfg: FedimgConfig, partition_id: int, labels: torch.Tensor,
                    num_classes: int) -> torch.Tensor:
    """``labels`` as client ``partition_id`` trains on them (flipped if it is malicious)."""
    attack = ATTACKS.get(cfg.attack.kind)
    if attack.poison_labels is None or partition_id not in malicious_clients(cfg):
        return labels
    return attack.poison_labels(labels, num_classes)


def poisoned_update(cfg: FedimgConfig, partition_id: int,
                    global_state: Mapping[str, torch.Tensor],
                    local_state: Mapping[str, torch.Tensor],
                    trained: frozenset[str]) -> dict[str, torch.Tensor]:
    """The state client ``partition_id`` sends: ``local_state``, poisoned if it is malicious.

    ``trained`` names the parameters the client trains; only those are altered.
    """
    attack = ATTACKS.get(cfg.attack.kind)
    out = dict(local_state)
    if attack.poison_update is None or partition_id not in malicious_clients(cfg):
        return out
    for key in trained:
        local, start = local_state[key], global_state[key].to(local_state[key].dtype)
        out[key] = attack.poison_update(start, local, cfg.attack.scale)
    return out
