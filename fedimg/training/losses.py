"""Per-class loss weights and logit masks computed from a client's own labels (plain PyTorch).

* :func:`balanced_class_weights`: the "balanced" heuristic (King & Zeng 2001, as in
  scikit-learn's ``compute_class_weight``), the one formula fedimg uses, with or
  without DP (DP-SGD feeds it noisy counts).
* :func:`restricted_logit_scale`: FedRS's mask of locally absent classes (Li & Zhan
  2021, "FedRS: Federated Learning with Restricted Softmax for Label Distribution
  Non-IID Data").
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
