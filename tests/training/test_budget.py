"""``train.local_budget``: the steps of a client's round, by hand, on sites of 16, 100, 440."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fedimg.config import TrainConfig
from fedimg.data import InMemoryLoader
from fedimg.training import train_local
from fedimg.training.budget import round_steps

SITES = (16, 100, 440)  # training samples of three sites, at batch 32


def _loader(n: int, *, batch_size: int = 32) -> InMemoryLoader:
    """``n`` random 8 px RGB images of 2 classes, shuffled batches of ``batch_size``."""
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 2, (n,), generator=g)
    return InMemoryLoader(images, labels, indices=np.arange(n), batch_size=batch_size,
                          transform=None, shuffle=True, seed=0)


def _steps(cfg: TrainConfig) -> list[int]:
    return [round_steps(cfg, batches=len(loader), num_samples=loader.num_examples)
            for loader in map(_loader, SITES)]


def test_epochs_budget_is_one_pass_of_ceil_n_over_b_batches() -> None:
    # ceil(16/32) = 1, ceil(100/32) = ceil(3.125) = 4, ceil(440/32) = ceil(13.75) = 14
    assert _steps(TrainConfig()) == [1, 4, 14]
    assert _steps(TrainConfig(local_epochs=2)) == [2, 8, 28]


def test_epochs_budget_with_local_steps_keeps_todays_exact_steps() -> None:
    assert _steps(TrainConfig(local_steps=10)) == [10, 10, 10]


def test_steps_budget_gives_every_site_the_same_steps() -> None:
    assert _steps(TrainConfig(local_budget="steps", local_steps=10)) == [10, 10, 10]


def test_steps_per_sample_budget_scales_with_the_data() -> None:
    # ceil(0.05 * 16) = ceil(0.8) = 1, 0.05 * 100 = 5, 0.05 * 440 = 22
    cfg = TrainConfig(local_budget="steps_per_sample", steps_per_sample=0.05)
    assert _steps(cfg) == [1, 5, 22]


def test_steps_per_sample_of_one_over_b_is_one_epoch() -> None:
    # 1/32 * (16, 100, 440) = 0.5, 3.125, 13.75 -> 1, 4, 14: the epochs budget's numbers
    cfg = TrainConfig(local_budget="steps_per_sample", steps_per_sample=1 / 32)
    assert _steps(cfg) == [1, 4, 14]


def test_steps_per_sample_never_gives_fewer_than_one_step() -> None:
    cfg = TrainConfig(local_budget="steps_per_sample", steps_per_sample=0.001)
    assert _steps(cfg) == [1, 1, 1]  # 0.016, 0.1, 0.44 round up to one step


def test_a_callers_local_steps_wins_under_every_budget() -> None:
    # a dropping client, or personalization's k steps, set local_steps on a copy
    cfg = TrainConfig(local_budget="steps_per_sample", steps_per_sample=0.05)
    assert _steps(dataclasses.replace(cfg, local_steps=3)) == [3, 3, 3]


@pytest.mark.parametrize(("budget", "expected"), [
    (dict(), 4), (dict(local_budget="steps", local_steps=10), 10),
    (dict(local_budget="steps_per_sample", steps_per_sample=0.05), 5)])
def test_train_local_takes_the_budgets_steps_on_a_100_sample_site(budget, expected) -> None:
    # Arrange: a linear classifier on 100 flattened 8 px images
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    cfg = TrainConfig(device="cpu", amp=False, channels_last=False, **budget)

    # Act
    result = train_local(model, _loader(100), cfg=cfg, lr=0.1, device=torch.device("cpu"))

    # Assert: an epoch is batches of 32, 32, 32, 4; 10 steps = 2 epochs + 2 batches of
    # the third, 5 steps = 1 epoch + 1 batch
    assert result.steps == expected
    assert result.as_metrics()["train/steps"] == float(expected)
    assert result.num_examples == {4: 100, 10: 2 * 100 + 2 * 32, 5: 100 + 32}[expected]
