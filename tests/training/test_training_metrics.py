"""classification_metrics against values worked out by hand in the comments."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from fedimg.errors import DataError, ModelError
from fedimg.training import classification_metrics


def _binary_logits(scores: list[float]) -> torch.Tensor:
    """Logits (N, 2) = [0, s]: softmax[:, 1] = sigmoid(s) ranks samples like s."""
    s = torch.tensor(scores)
    return torch.stack([torch.zeros_like(s), s], dim=1)


def test_binary_metrics_match_hand_computation():
    # Arrange: labels 0,0,1,1 with scores -2, 0.5, 0.2, 3 -> predictions 0,1,1,1.
    logits = _binary_logits([-2.0, 0.5, 0.2, 3.0])
    labels = torch.tensor([0, 0, 1, 1])

    # Act
    m = classification_metrics(logits, labels, num_classes=2)

    # Assert
    assert m["accuracy"] == pytest.approx(3 / 4)
    # recall(0) = 1/2, recall(1) = 2/2 -> mean 3/4
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)
    # class 0: P=1, R=1/2 -> F1=2/3; class 1: P=2/3, R=1 -> F1=4/5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # positive/negative pairs: 0.2>-2 yes, 0.2>0.5 no, 3>-2 yes, 3>0.5 yes -> 3/4
    assert m["auc"] == pytest.approx(0.75)
    assert "top5" not in m


def test_balanced_accuracy_and_macro_f1_on_imbalanced_labels():
    # Arrange: 3 of class 0, 1 of class 1; the model always predicts 0.
    logits = _binary_logits([-1.0, -1.0, -1.0, -1.0])
    labels = torch.tensor([0, 0, 0, 1])

    # Act
    m = classification_metrics(logits, labels, num_classes=2)

    # Assert
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0) / 2)
    # class 0: P=3/4, R=1 -> F1=6/7; class 1: no true positive -> F1=0
    assert m["macro_f1"] == pytest.approx((6 / 7 + 0) / 2)


def test_macro_f1_averages_only_classes_present_in_labels_or_predictions():
    # Arrange: 4 classes in the head but only classes 0 and 1 ever occur.
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    labels = torch.tensor([0, 1])

    # Act
    m = classification_metrics(logits, labels, num_classes=4)

    # Assert: both present classes perfect -> mean over 2 classes is 1, not 2/4.
    assert m["macro_f1"] == pytest.approx(1.0)


def test_multiclass_auc_is_mean_one_vs_rest_over_classes_in_labels():
    # Arrange: 3 classes, labels only 0 and 1 (class 2 absent).
    # Softmax column 0 per row: .909, .212, .576, .106 ; column 1: .045, .576, .212, .787
    # class 0 (rows 0,1 positive): .909>.576 .909>.106 .212<.576 .212>.106 -> 3/4
    # class 1 (rows 2,3 positive): .212>.045 .212<.576 .787>.045 .787>.576 -> 3/4
    logits = torch.tensor([[3.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 2.0, 0]])
    labels = torch.tensor([0, 0, 1, 1])

    # Act
    m = classification_metrics(logits, labels, num_classes=3)

    # Assert
    assert m["auc"] == pytest.approx(0.75)


def test_auc_is_nan_when_only_one_class_is_present():
    # Arrange
    logits = _binary_logits([0.3, -0.2, 1.0])
    labels = torch.tensor([1, 1, 1])

    # Act
    m = classification_metrics(logits, labels, num_classes=2)

    # Assert
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_top5_on_six_classes():
    # Arrange: every row ranks classes 0 > 1 > 2 > 3 > 4 > 5.
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0]] * 4)
    labels = torch.tensor([0, 4, 5, 5])  # ranks 1, 5, 6, 6 -> 2 of 4 in the top 5

    # Act
    m = classification_metrics(logits, labels, num_classes=6)

    # Assert
    assert m["top5"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(0.25)


def test_all_values_are_python_floats():
    # Arrange
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])

    # Act
    m = classification_metrics(logits, labels, num_classes=6)

    # Assert
    assert set(m) == {"accuracy", "balanced_accuracy", "macro_f1", "auc", "top5"}
    assert all(type(v) is float for v in m.values())


def test_head_size_mismatch_names_both_sizes():
    # Arrange
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 1])

    # Act / Assert
    with pytest.raises(ModelError, match=r"\(2, 3\).*4 classes"):
        classification_metrics(logits, labels, num_classes=4)


def test_label_out_of_range_is_a_data_error():
    # Arrange
    logits, labels = torch.zeros(2, 2), torch.tensor([0, 2])

    # Act / Assert
    with pytest.raises(DataError, match="0..1"):
        classification_metrics(logits, labels, num_classes=2)


def test_a_diverged_models_nan_scores_give_a_nan_auc_not_a_crash():
    # Arrange: a model whose weights went to NaN scores every image NaN
    logits = torch.full((4, 3), float("nan"))
    labels = torch.tensor([0, 1, 2, 1])
    # Act
    metrics = classification_metrics(logits, labels, num_classes=3)
    # Assert
    assert math.isnan(metrics["auc"])


@pytest.mark.parametrize("seed", range(12))
def test_every_metric_equals_scikit_learns_definition(seed):
    # Arrange: random logits, ties in the scores (rounded), skewed labels, some classes
    # missing from the labels; scikit-learn as the oracle (fedimg no longer imports it)
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        f1_score,
        roc_auc_score,
        top_k_accuracy_score,
    )

    rng = np.random.default_rng(seed)
    k = [2, 3, 6, 10][seed % 4]
    n = int(rng.integers(8, 200))
    labels = torch.from_numpy(rng.choice(k, size=n, p=rng.dirichlet(np.ones(k)) * 0.9
                                         + 0.1 / k))
    logits = torch.from_numpy(np.round(rng.normal(size=(n, k)), 1 if seed % 2 else 6))
    # Act
    got = classification_metrics(logits, labels, num_classes=k)
    # Assert
    y, pred = labels.numpy(), logits.argmax(1).numpy()
    probs = torch.softmax(logits.double(), 1).numpy()
    present = np.union1d(y, pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["accuracy"] == accuracy_score(y, pred)
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred),
                                                         abs=1e-12)
        assert got["macro_f1"] == pytest.approx(
            f1_score(y, pred, labels=present, average="macro", zero_division=0), abs=1e-12)
        if k >= 5:
            assert got["top5"] == top_k_accuracy_score(y, probs, k=5, labels=np.arange(k))
    classes = np.unique(y)
    if len(classes) < 2:
        assert np.isnan(got["auc"])
    elif k == 2:
        assert got["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    else:
        want = np.mean([roc_auc_score(y == c, probs[:, c]) for c in classes])
        assert got["auc"] == pytest.approx(want, abs=1e-12)
