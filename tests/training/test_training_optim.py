"""Optimizer registry and the per-round learning-rate schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedimg.config import TrainConfig
from fedimg.errors import ConfigError
from fedimg.training import OPTIMIZERS, SCHEDULES, build_optimizer, scheduled_lr


def _lr(schedule: str, server_round: int, total_rounds: int, lr: float = 0.1) -> float:
    cfg = TrainConfig(schedule=schedule, lr=lr)
    return scheduled_lr(cfg, server_round=server_round, total_rounds=total_rounds)


def test_registries_hold_the_documented_names():
    assert OPTIMIZERS.names() == ["adamw", "sgd"]
    assert SCHEDULES.names() == ["constant", "cosine", "step"]


def test_sgd_uses_config_momentum_and_weight_decay():
    # Arrange
    model = nn.Linear(3, 2)
    cfg = TrainConfig(optimizer="sgd", momentum=0.5, weight_decay=0.01)

    # Act
    opt = build_optimizer(model.parameters(), cfg=cfg, lr=0.2)

    # Assert
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.2, 0.5, 0.01)
    assert group["nesterov"] is False


def test_adamw_is_built_by_name():
    # Arrange
    cfg = TrainConfig(optimizer="adamw", weight_decay=0.05)

    # Act
    opt = build_optimizer(nn.Linear(3, 2).parameters(), cfg=cfg, lr=1e-3)

    # Assert
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_only_trainable_parameters_are_optimized():
    # Arrange: Linear(3, 2) has a weight (6 values) and a bias (2); freeze the weight.
    model = nn.Linear(3, 2)
    model.weight.requires_grad_(False)

    # Act
    opt = build_optimizer(model.parameters(), cfg=TrainConfig(), lr=0.1)

    # Assert
    params = opt.param_groups[0]["params"]
    assert len(params) == 1 and params[0] is model.bias


def test_all_frozen_is_a_config_error():
    # Arrange
    model = nn.Linear(3, 2).requires_grad_(False)

    # Act / Assert
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model.parameters(), cfg=TrainConfig(), lr=0.1)


def test_unknown_optimizer_lists_valid_names():
    # Arrange
    cfg = TrainConfig(optimizer="adam")

    # Act / Assert
    with pytest.raises(ConfigError, match=r"'adam' \(train.optimizer\); valid names: adamw, sgd"):
        build_optimizer(nn.Linear(3, 2).parameters(), cfg=cfg, lr=0.1)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ConfigError, match="valid names: constant, cosine, step"):
        _lr("linear", 1, 10)


def test_constant_schedule():
    assert [_lr("constant", r, 4) for r in (1, 2, 3, 4)] == [0.1] * 4


def test_cosine_schedule_starts_at_lr_and_halves_at_midpoint():
    # round 1: cos(0) = 1 -> lr; round 6 of 10: cos(pi * 5/10) = 0 -> lr/2
    assert _lr("cosine", 1, 10) == pytest.approx(0.1)
    assert _lr("cosine", 6, 10) == pytest.approx(0.05)
    # last round 10 of 10: 0.5 * (1 + cos(0.9 pi)) = 0.02447 -> small but > 0
    assert _lr("cosine", 10, 10) == pytest.approx(0.1 * 0.5 * (1 - 0.9510565))


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
    # 4 rounds: progress (r-1)/4 = 0, .25, .5, .75
    lrs = [_lr("step", r, 4) for r in (1, 2, 3, 4)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_round_outside_range_is_rejected():
    with pytest.raises(ValueError, match="server_round=0"):
        _lr("cosine", 0, 10)


def _warm(schedule: str, rounds: int, warmup: int) -> list[float]:
    cfg = TrainConfig(schedule=schedule, lr=0.1, warmup_rounds=warmup)
    return [scheduled_lr(cfg, server_round=r, total_rounds=rounds) for r in range(1, rounds + 1)]


def test_three_warmup_rounds_then_cosine_over_the_other_four():
    # Arrange / Act: 7 rounds, warm-up lr * r / 4 in rounds 1-3, then cosine over 4
    # rounds at progress (r - 4) / 4 = 0, 1/4, 1/2, 3/4
    lrs = _warm("cosine", 7, 3)

    # Assert: cos(pi/4) = 0.7071068
    assert lrs == pytest.approx([0.025, 0.05, 0.075,
                                 0.1, 0.05 * 1.7071068, 0.05, 0.05 * 0.2928932])


def test_warmup_then_step_counts_milestones_after_the_warmup():
    # 6 rounds, 2 of warm-up (lr/3, 2lr/3); step over 4 rounds: progress 0, .25, .5, .75
    assert _warm("step", 6, 2) == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.01, 0.001])


def test_no_warmup_leaves_the_schedule_unchanged():
    assert _warm("cosine", 10, 0) == pytest.approx([_lr("cosine", r, 10) for r in range(1, 11)])
