"""Membership-inference maths against hand-derived numbers and synthetic attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from fedimg.errors import ConfigError, DataError
from fedimg.audit.mia import (
    attack_metrics,
    dp_auc_bound,
    dp_tpr_bound,
    lira_scores,
    loss_threshold_scores,
    per_sample_loss,
    shadow_splits,
    true_class_confidence,
)

# --------------------------------------------------------------------- confidences


def test_true_class_confidence_matches_hand_computation():
    # Arrange: 2 classes, logits [0, 2] -> p_1 = e^2 / (1 + e^2), so
    # log p_1 - log(1 - p_1) = log(e^2) = 2 and, for label 0, -2.
    logits = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    labels = torch.tensor([1, 0])

    # Act
    phi = true_class_confidence(logits, labels)

    # Assert
    assert phi == pytest.approx([2.0, -2.0])


def test_true_class_confidence_is_finite_where_softmax_saturates():
    # Arrange: 3 classes, logits [100, 0, 0]: p_0 rounds to 1 in float32, yet
    # phi = 100 - log(e^0 + e^0) = 100 - log 2.
    logits = torch.tensor([[100.0, 0.0, 0.0]])

    # Act
    phi = true_class_confidence(logits, torch.tensor([0]))

    # Assert
    assert phi[0] == pytest.approx(100 - math.log(2))


def test_per_sample_loss_and_loss_threshold_scores():
    # Arrange: logits [0, 0] -> p = 1/2 for either label -> loss log 2.
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    labels = torch.tensor([0, 1])

    # Act
    losses = per_sample_loss(logits, labels)
    scores = loss_threshold_scores(losses)

    # Assert: second row p_1 = 3/4 -> loss log(4/3).
    assert losses == pytest.approx([math.log(2), math.log(4 / 3)])
    assert scores == pytest.approx(-losses)


def test_confidence_rejects_mismatched_labels():
    with pytest.raises(DataError, match="labels must be"):
        true_class_confidence(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


# -------------------------------------------------------------------------- metrics


def test_perfectly_separable_scores_give_auc_one_and_full_tpr_at_low_fpr():
    # Arrange: every member scores above every non-member.
    scores = np.concatenate([np.arange(100) + 1000.0, np.arange(100, dtype=float)])
    members = np.r_[np.ones(100, bool), np.zeros(100, bool)]

    # Act
    m = attack_metrics(scores, members)

    # Assert
    assert m["auc"] == pytest.approx(1.0)
    assert m["tpr_at_fpr_0.001"] == pytest.approx(1.0)
    assert m["tpr_at_fpr_0.01"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx(1.0)


def test_hand_computed_roc_points():
    # Arrange: members score 4, 2; non-members 3, 1.
    # Thresholds: >=4 -> TPR 1/2 at FPR 0; >=3 -> TPR 1/2, FPR 1/2; >=2 -> 1, 1/2.
    # AUC = pairs (member > non-member) = (4>3, 4>1, 2>1) = 3/4.
    scores = np.array([4.0, 2.0, 3.0, 1.0])
    members = np.array([True, True, False, False])

    # Act
    m = attack_metrics(scores, members)

    # Assert
    assert m["auc"] == pytest.approx(0.75)
    assert m["tpr_at_fpr_0.001"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.75)  # (1 + 1 - 1/2) / 2


def test_random_scores_give_chance_auc():
    # Arrange: 20k scores independent of membership; AUC std ~ 0.004 here.
    rng = np.random.default_rng(0)
    scores = rng.normal(size=20_000)
    members = rng.random(20_000) < 0.5

    # Act
    m = attack_metrics(scores, members)

    # Assert
    assert m["auc"] == pytest.approx(0.5, abs=0.02)
    assert m["tpr_at_fpr_0.01"] < 0.03


def test_attack_metrics_needs_both_classes():
    with pytest.raises(DataError, match="both members and non-members"):
        attack_metrics(np.zeros(4), np.ones(4, bool))


# ------------------------------------------------------------------------ DP bounds


def test_dp_tpr_bound_hand_values():
    # eps=1, delta=1e-5, FPR=0.01: e*0.01 + 1e-5 = 0.027193 < 1 - e^-1 (0.98999) = 0.6358.
    assert dp_tpr_bound(1.0, 1e-5, 0.01) == pytest.approx(math.e * 0.01 + 1e-5)
    # eps=0: TPR <= FPR + delta.
    assert dp_tpr_bound(0.0, 1e-3, 0.2) == pytest.approx(0.2 + 1e-3)
    # Large FPR: the third term binds. eps=1, delta=0, FPR=0.9: 1 - e^-1 * 0.1.
    assert dp_tpr_bound(1.0, 0.0, 0.9) == pytest.approx(1 - 0.1 / math.e)
    # No privacy.
    assert dp_tpr_bound(math.inf, 0.0, 0.0) == 1.0


def test_dp_auc_bound_hand_values():
    # eps=0, delta=0: TPR <= FPR, the diagonal -> AUC 1/2.
    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5)
    assert dp_auc_bound(math.inf, 0.0) == pytest.approx(1.0)
    # delta=0: the bound is e^eps x up to x* = 1/(e^eps + 1), then 1 - e^-eps (1 - x);
    # integral = e^eps x*^2 / 2 + [(1 - x*) - e^-eps (1 - x*)^2 / 2] for eps = 1.
    e = math.e
    x = 1 / (e + 1)
    expected = e * x**2 / 2 + (1 - x) - (1 - x) ** 2 / (2 * e)
    assert dp_auc_bound(1.0, 0.0) == pytest.approx(expected, abs=1e-9)


def test_dp_bounds_reject_bad_parameters():
    with pytest.raises(ConfigError, match="epsilon"):
        dp_tpr_bound(-1.0, 0.0, 0.1)
    with pytest.raises(ConfigError, match="fpr"):
        dp_tpr_bound(1.0, 0.0, 1.5)


# ----------------------------------------------------------------------------- LiRA


def test_shadow_splits_are_balanced():
    # Act
    even = shadow_splits(num_examples=101, num_shadows=8, seed=0)
    odd = shadow_splits(num_examples=100, num_shadows=5, seed=0)

    # Assert: even S -> every example IN for exactly S/2 shadows.
    assert even.shape == (8, 101)
    assert (even.sum(0) == 4).all()
    # Odd S -> 2 or 3, half of the examples each.
    assert set(odd.sum(0).tolist()) == {2, 3}
    assert (odd.sum(0) == 3).sum() == 50
    # Each shadow sees about half of the pool (not a fixed subset).
    assert np.all(np.abs(even.sum(1) - 50.5) < 20)
    assert not np.array_equal(even, shadow_splits(num_examples=101, num_shadows=8, seed=1))


def _synthetic_lira(num_examples: int = 4000, num_shadows: int = 64, seed: int = 0):
    """Confidences with a per-example difficulty: OUT ~ N(d_i, 1), IN ~ N(d_i + 2, 1).

    The difficulty d_i ~ N(0, 50^2) swamps the +2 member shift for a global
    threshold: its AUC is Phi(2 / sqrt(2 (2500 + 1))) = 0.511. A per-example
    test sees N(0, 1) vs N(2, 1): AUC Phi(2 / sqrt 2) = 0.921.
    """
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.0, 50.0, size=num_examples)  # (N,)
    keep = shadow_splits(num_examples, num_shadows, seed=seed + 1)  # (S, N)
    shadow = difficulty + 2.0 * keep + rng.normal(size=keep.shape)
    member = rng.random(num_examples) < 0.5
    target = difficulty + 2.0 * member + rng.normal(size=num_examples)
    return target, shadow, keep, member


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("fixed_variance", [True, False])
def test_lira_beats_loss_threshold_on_synthetic_gaussians(online, fixed_variance):
    # Arrange
    target, shadow, keep, member = _synthetic_lira()

    # Act
    scores = lira_scores(target, shadow, keep, online=online, fixed_variance=fixed_variance)
    lira = attack_metrics(scores, member)
    # The confidence is a decreasing function of the loss, so thresholding it
    # is the loss attack.
    global_threshold = attack_metrics(target, member)

    # Assert
    assert lira["auc"] > 0.9
    assert lira["auc"] == pytest.approx(norm.cdf(math.sqrt(2)), abs=0.02)
    assert global_threshold["auc"] == pytest.approx(0.511, abs=0.03)


def test_lira_chooses_online_when_every_example_has_in_and_out_shadows():
    # Arrange
    target, shadow, keep, _ = _synthetic_lira(num_examples=200, num_shadows=4)

    # Act / Assert
    assert lira_scores(target, shadow, keep) == pytest.approx(
        lira_scores(target, shadow, keep, online=True))
    all_out = np.zeros_like(keep)
    assert lira_scores(target, shadow, all_out) == pytest.approx(
        lira_scores(target, shadow, all_out, online=False))


def test_lira_is_nan_free_when_some_examples_lack_out_shadows():
    # Arrange: examples 0..9 are IN for every shadow (no OUT estimate).
    target, shadow, keep, member = _synthetic_lira(num_examples=400, num_shadows=8)
    keep[:, :10] = True

    # Act
    offline = lira_scores(target, shadow, keep, online=False)
    online = lira_scores(target, shadow, keep, online=True, fixed_variance=False)
    auto = lira_scores(target, shadow, keep)

    # Assert
    for scores in (offline, online, auto):
        assert np.isfinite(scores).all()
    assert attack_metrics(offline, member)["auc"] > 0.8


def test_lira_rejects_shadows_that_never_leave_an_example_out():
    target, shadow, keep, _ = _synthetic_lira(num_examples=50, num_shadows=4)
    with pytest.raises(ConfigError, match="WITHOUT"):
        lira_scores(target, shadow, np.ones_like(keep))


# ----------------------------------------------------------------------- end to end


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_loss_attack_detects_an_overfit_mlp(one_thread):
    # Arrange: an MLP memorises 200 random points with random labels; 200 more
    # from the same distribution are never seen, so their loss stays high.
    torch.manual_seed(0)
    x = torch.randn(400, 20)
    y = torch.randint(0, 4, (400,))
    members = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:200]), y[:200]).backward()
        optimizer.step()

    # Act
    with torch.no_grad():
        logits = model(x)
    m = attack_metrics(loss_threshold_scores(per_sample_loss(logits, y)), members)

    # Assert: train loss near 0 vs held-out loss of a random guess or worse.
    assert m["auc"] > 0.8
    assert m["balanced_accuracy"] > 0.7
