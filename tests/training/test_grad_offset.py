"""train_local's gradient offset (SCAFFOLD's c - c_i, FedDyn's -g_k), one step by hand."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedimg.config import TrainConfig
from fedimg.training import train_local

CPU = torch.device("cpu")
SGD = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, local_steps=1,
                  amp=False, channels_last=False)


def _zero_linear() -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


def _one_sample() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))]  # one batch of one sample


def test_one_sgd_step_moves_by_the_gradient_plus_the_offset() -> None:
    # Arrange: W = 0, so the logits are [0, 0], softmax [.5, .5], and for x = [1, 0],
    # label 0: dCE/dW = outer([-.5, .5], [1, 0]) = [[-.5, 0], [.5, 0]]
    model = _zero_linear()
    offset = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    # Act: one step, lr 0.1
    train_local(model, _one_sample(), cfg=SGD, lr=0.1, device=CPU,
                grad_offset=[(model.weight, offset)])
    # Assert: W = -0.1 (grad + offset) = -0.1 [[.5, 1], [1.5, 1]]
    expected = torch.tensor([[-0.05, -0.1], [-0.15, -0.1]])
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-7)


def test_feddyn_steps_follow_the_gradient_minus_g_plus_alpha_times_the_distance() -> None:
    # Arrange: FedDyn's client objective CE - <g, W> + alpha/2 ||W - 0||^2 with g = I
    # (offset -g), alpha 0.5, lr 0.1, two steps on the same sample.
    model = _zero_linear()
    cfg = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, local_steps=2,
                      amp=False, channels_last=False)
    # Act
    train_local(model, _one_sample(), cfg=cfg, lr=0.1, device=CPU, proximal_mu=0.5,
                grad_offset=[(model.weight, -torch.eye(2))])
    # Assert. Step 1 (W = 0, no pull yet): W1 = -0.1 ([[-.5, 0], [.5, 0]] - I)
    # = [[.15, 0], [-.05, .1]]. Step 2: logits W1 x = [.15, -.05], so p1 = 1 / (1 + e^.2)
    # and dCE/dW = [[-p1, 0], [p1, 0]]; the pull alpha W1 = [[.075, 0], [-.025, .05]];
    # W2 = W1 - 0.1 (dCE/dW + alpha W1 - I)
    p1 = 1 / (1 + math.exp(0.2))
    expected = torch.tensor([[0.15 - 0.1 * (-p1 + 0.075 - 1), 0.0],
                             [-0.05 - 0.1 * (p1 - 0.025), 0.1 - 0.1 * (0.05 - 1)]])
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-6)


def test_no_offset_is_plain_sgd() -> None:
    a, b = _zero_linear(), _zero_linear()
    train_local(a, _one_sample(), cfg=SGD, lr=0.1, device=CPU)
    train_local(b, _one_sample(), cfg=SGD, lr=0.1, device=CPU,
                grad_offset=[(b.weight, torch.zeros(2, 2))])
    assert torch.equal(a.weight, b.weight)
    torch.testing.assert_close(a.weight.detach(), torch.tensor([[0.05, 0.0], [-0.05, 0.0]]))
