"""Per-class loss weights and logit masks computed from a client's own labels (plain PyTorch).

* :func:`balanced_class_weights`: the "balanced" heuristic (King & Zeng 2001, as in
  scikit-learn's ``compute_class_weight``), the one formula fedimg uses, with or
  without DP (DP-SGD feeds it noisy counts).
* :func:`restricted_logit_scale`: FedRS's mask of locally absent classes (Li & Zhan
  2021, "FedRS: Federated Learning with Restricted Softmax for Label Distribution
  Non-IID Data").
* :func:`calibrated_logit_shift`: FedLC's label-dependent logit calibration (Zhang et
  al. 2022, "Federated Learning with Label Distribution Skew via Logits Calibration",
  ICML).
"""

from __future__ import annotations

import torch


def balanced_weights_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """n / (k * n_c) for each of the k classes with a positive count (1 for the others).

    Each present class then carries the same total weight in the local loss and the
    mean weight per sample stays 1. Noisy DP counts are clamped to >= 1 before they
    get here, so under DP every class counts as present.
    """
    counts = counts.double()
    present = counts > 0
    weights = torch.ones(len(counts), dtype=torch.float64)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return weights  # float64: DP-SGD writes these into its ledger


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """:func:`balanced_weights_from_counts` of the label counts in ``labels``."""
    return balanced_weights_from_counts(torch.bincount(labels, minlength=num_classes)).float()


def restricted_logit_scale(labels: torch.Tensor, num_classes: int,
                           alpha: float) -> torch.Tensor:
    """(K,) 1 for the classes present in ``labels``, ``alpha`` for the others (FedRS)."""
    present = torch.bincount(labels, minlength=num_classes) > 0
    return torch.where(present, 1.0, float(alpha))


def calibrated_logit_shift(labels: torch.Tensor, num_classes: int,
                           tau: float) -> torch.Tensor:
    """(K,) FedLC's shift: ``-tau * n_c ** (-1/4)`` for present classes, -inf for absent.

    Added to the logits before the cross-entropy, it asks a larger margin of the
    client's rare classes than of its frequent ones (Zhang et al. 2022, eq. 7). A class
    the client never sees has ``n_c = 0`` and a shift of ``-inf``, as in the authors'
    code: it drops out of the local softmax, so the client neither pushes its score
    down nor changes its weights.
    """
    counts = torch.bincount(labels, minlength=num_classes).float()
    shift = torch.full((num_classes,), float("-inf"))
    present = counts > 0
    shift[present] = -float(tau) * counts[present].pow(-0.25)
    return shift
