"""The closed-form ridge head (Fed3R): hand-computed solution, sums that add up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedimg.training.closed_form import HeadStatistics, head_statistics, ridge_head

CPU = torch.device("cpu")


def test_the_ridge_head_of_two_points_matches_a_hand_solution() -> None:
    # Arrange: 1-D features 1 (class 0) and 2 (class 1), with the constant 1 appended:
    # G = [[5, 3], [3, 2]], M = [[1, 2], [1, 1]]; mean diagonal 3.5, so relative
    # lambda 2/7 is lambda = 1, and (G + I)^-1 M = [[0, 1/3], [1/3, 0]]
    stats = HeadStatistics(torch.tensor([[5.0, 3.0], [3.0, 2.0]], dtype=torch.float64),
                           torch.tensor([[1.0, 2.0], [1.0, 1.0]], dtype=torch.float64), 2)
    # Act
    weight, bias = ridge_head(stats, relative_lambda=2 / 7)
    # Assert
    assert weight.flatten().tolist() == pytest.approx([0.0, 1 / 3], abs=1e-7)  # (K=2, D=1)
    assert bias.tolist() == pytest.approx([1 / 3, 0.0], abs=1e-7)


def test_clients_holding_one_class_each_sum_to_the_pooled_statistics() -> None:
    # Arrange: a small network whose head reads 6 features; 3 clients, one class each
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 3))
    model.train()  # the statistics must be taken in eval mode, and the mode restored
    x = torch.randn(30, 3, 2, 2)
    y = torch.arange(3).repeat_interleave(10)
    clients = [[(x[10 * k:10 * k + 10], y[10 * k:10 * k + 10])] for k in range(3)]
    # Act
    parts = [head_statistics(model, model[4], c, num_classes=3, device=CPU) for c in clients]
    pooled = head_statistics(model, model[4], [(x[:17], y[:17]), (x[17:], y[17:])],
                             num_classes=3, device=CPU)
    total = parts[0] + parts[1] + parts[2]
    # Assert: the same sums, 30 images, the features as the eval-mode network computes them
    assert model.training and total.count == pooled.count == 30
    assert torch.allclose(total.gram, pooled.gram, rtol=1e-12, atol=1e-12)
    assert torch.allclose(total.moment, pooled.moment, rtol=1e-12, atol=1e-12)
    assert pooled.moment[-1].tolist() == [10.0, 10.0, 10.0]  # class counts
    with torch.no_grad():
        model.eval()
        phi = model[:4](x).double()
    assert torch.allclose(pooled.gram[:-1, :-1], phi.T @ phi, rtol=1e-10)


def test_a_separable_problem_is_solved_by_the_head() -> None:
    # Arrange: features that one linear map separates; a small penalty
    torch.manual_seed(1)
    centers = torch.eye(4) * 5
    y = torch.arange(4).repeat(25)
    x = centers[y] + 0.1 * torch.randn(100, 4)
    head = nn.Linear(4, 4)
    model = nn.Sequential(head)
    stats = head_statistics(model, head, [(x, y)], num_classes=4, device=CPU)
    # Act
    weight, bias = ridge_head(stats, relative_lambda=1e-3)
    # Assert: every point is classified right
    assert ((x @ weight.T + bias).argmax(1) == y).all()
