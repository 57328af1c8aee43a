"""Classification metrics of a set of logits, in NumPy (scikit-learn's definitions).

Each value is a plain Python float, so it can go straight into a Flower
``MetricRecord`` or a JSON file. Federated evaluation sees small, label-skewed
client test sets, where some classes are missing; the choices below keep every
metric defined in that case:

* ``accuracy``: fraction of argmax predictions equal to the label.
* ``balanced_accuracy``: mean recall over the classes present in ``labels``
  (scikit-learn's ``balanced_accuracy_score``).
* ``macro_f1``: unweighted mean F1 over the classes present in ``labels`` or in
  the predictions; a class with no true and no predicted sample is left out,
  and an undefined precision or recall counts as 0 (``zero_division=0``).
* ``auc``: area under the ROC curve. Binary: ``roc_auc_score(y, p1)`` with
  ``p1`` the softmax probability of class 1. Multi-class: one-vs-rest binary AUC
  of each class present in ``labels`` (scored by its softmax column), averaged
  with equal weights. With every class present this equals scikit-learn's
  ``roc_auc_score(..., multi_class="ovr", average="macro")``. NaN when fewer
  than two classes are present, where no ROC curve exists.
* ``top5``: the label is among the 5 highest logits (only when
  ``num_classes >= 5``; with exactly 5 classes it is always 1).

Each follows scikit-learn's definition, in a few lines of NumPy
(``tests/training/test_training_metrics.py`` checks them against it): importing
``sklearn.metrics`` cost every worker and site daemon about 1.3 s and 80 MiB (it pulls
in pandas), for five functions. The binary AUC is the Mann-Whitney statistic with tied
scores counted half (Mann and Whitney 1947), the area under scikit-learn's ROC curve.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedimg.errors import DataError, ModelError


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, *, num_classes: int
) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, AUC (and top-5) of ``logits`` (N, K)."""
    _check_shapes(logits, labels, num_classes=num_classes)
    y_pred = logits.detach().argmax(dim=1).cpu().numpy()  # (N,)
    probs = torch.softmax(logits.detach().double(), dim=1).cpu().numpy()  # (N, K)
    y_true = labels.detach().cpu().numpy()  # (N,)
    present = np.union1d(y_true, y_pred)  # classes seen as label or prediction
    metrics = {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else math.nan,
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_f1": _macro_f1(y_true, y_pred, present),
        "auc": _macro_auc(y_true, probs),
    }
    if num_classes >= 5:  # the 5 highest scores (ties: the higher class index first)
        top = np.argsort(probs, axis=1, kind="mergesort")[:, ::-1][:, :5]
        metrics["top5"] = float(np.mean((top == y_true[:, None]).any(axis=1)))
    return metrics


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
    classes = np.unique(y_true)
    recalls = [np.sum((y_true == c) & (y_pred == c)) / np.sum(y_true == c) for c in classes]
    return float(np.mean(recalls)) if recalls else math.nan


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean F1 over ``labels``: 2 tp / (2 tp + fp + fn), 0 where undefined."""
    scores = []
    for c in labels:
        tp = float(np.sum((y_true == c) & (y_pred == c)))
        denominator = float(np.sum(y_true == c)) + float(np.sum(y_pred == c))
        scores.append(2.0 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores)) if scores else math.nan


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean labels ``positive``: the probability that a
    positive outscores a negative, ties counted half (Mann and Whitney 1947)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranked = np.asarray(scores)[order]
    new = np.r_[True, ranked[1:] != ranked[:-1]]  # (N,) first of a run of equal scores
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(ranked)]
    run = np.cumsum(new) - 1  # (N,) which run each score is in
    ranks = (starts[run] + 1 + ends[run]) / 2.0  # 1-based; tied scores share their mean rank
    rank_sum = float(ranks[positive[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest ROC AUC averaged over the classes present in ``y_true``.

    NaN when fewer than two classes are present, or when a diverged model's scores
    are not finite (the loss says so too): a metric, never a crashed evaluation.
    """
    present = np.unique(y_true)
    if len(present) < 2 or not np.isfinite(probs).all():
        return math.nan
    if probs.shape[1] == 2:
        return binary_auc(y_true == 1, probs[:, 1])
    return float(np.mean([binary_auc(y_true == k, probs[:, k]) for k in present]))


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> None:
    """Raise a helpful error when the head or the labels do not fit ``num_classes``."""
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ModelError(
            f"the model outputs logits of shape {tuple(logits.shape)} but the dataset "
            f"has {num_classes} classes (expected (N, {num_classes})); fix: build the "
            "model's head with the dataset's number of classes"
        )
    if labels.shape != (logits.shape[0],):
        raise DataError(
            f"labels have shape {tuple(labels.shape)}, expected ({logits.shape[0]},): "
            "one int64 class index per image; fix: squeeze the label column"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"labels span {int(labels.min())}..{int(labels.max())}, outside the valid "
            f"range 0..{num_classes - 1}; fix: remap the labels or set num_classes"
        )


COUNT_PREFIX = "count/"  # per-class counts: summed across clients, never averaged


def class_counts(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``count/support/<c>`` (images of class c) and ``count/hits/<c>`` (of them, predicted
    c), for the classes present in ``labels``: what :func:`pooled_balanced_accuracy`
    sums across clients."""
    y_pred = logits.detach().argmax(dim=1).cpu()
    y_true = labels.detach().cpu()
    out: dict[str, float] = {}
    for c in torch.unique(y_true).tolist():
        mask = y_true == c
        out[f"{COUNT_PREFIX}support/{c}"] = float(mask.sum())
        out[f"{COUNT_PREFIX}hits/{c}"] = float((y_pred[mask] == c).sum())
    return out


def pooled_balanced_accuracy(counts: list[dict[str, float]]) -> float:
    """Balanced accuracy of several clients' predictions as if pooled: per class, the sum
    of hits over the sum of support, averaged over the classes any client holds.

    Unlike the mean of each client's own balanced accuracy, a client holding one image
    of a class moves it by that one image's share, not by half its score. NaN if no
    client sent counts.
    """
    support: dict[str, float] = {}
    hits: dict[str, float] = {}
    for one in counts:
        for key, value in one.items():
            kind, _, c = key.removeprefix(COUNT_PREFIX).partition("/")
            (support if kind == "support" else hits)[c] = \
                (support if kind == "support" else hits).get(c, 0.0) + value
    recalls = [hits.get(c, 0.0) / n for c, n in support.items() if n > 0]
    return float(np.mean(recalls)) if recalls else float("nan")
