"""train_local's proximal term centred away from the start (Ditto), one step by hand."""

from __future__ import annotations

import torch
from torch import nn

from fedimg.config import TrainConfig
from fedimg.training import train_local

CPU = torch.device("cpu")
SGD = TrainConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, local_steps=1,
                  amp=False, channels_last=False)


def _zero_linear() -> nn.Linear:
    layer = nn.Linear(1, 2, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


SAMPLE = [(torch.tensor([[1.0]]), torch.tensor([0]))]  # x = 1, label 0


def test_the_pull_points_at_the_anchor_not_the_start() -> None:
    # Arrange: W = 0, logits [0, 0], so dCE/dW = [[-.5], [.5]]; anchor A = [[1], [1]]
    model = _zero_linear()
    anchor = torch.ones(2, 1)
    # Act: one step, lr 0.1, mu 2: W = 0 - 0.1 (dCE/dW + 2 (0 - A))
    train_local(model, SAMPLE, cfg=SGD, lr=0.1, device=CPU, proximal_mu=2.0,
                proximal_anchors=[(model.weight, anchor)])
    # Assert: -0.1 ([[-.5], [.5]] - 2) = [[.25], [.15]]
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[0.25], [0.15]]))


def test_without_anchors_the_term_is_fedprox_and_has_no_first_step_pull() -> None:
    a, b = _zero_linear(), _zero_linear()
    train_local(a, SAMPLE, cfg=SGD, lr=0.1, device=CPU, proximal_mu=2.0)
    train_local(b, SAMPLE, cfg=SGD, lr=0.1, device=CPU)
    assert torch.equal(a.weight, b.weight)  # centred at the start: 0 at the first step
