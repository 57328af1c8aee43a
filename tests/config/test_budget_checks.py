"""``train.local_budget`` and ``train.warmup_rounds``: refused combinations, one line each."""

from __future__ import annotations

import dataclasses

import pytest

from fedimg.config import FedimgConfig, LocalBudget, from_json, to_json, validate
from fedimg.errors import ConfigError


def _with(*, rounds: int = 10, **train: object) -> FedimgConfig:
    cfg = FedimgConfig(rounds=rounds)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


@pytest.mark.parametrize(("train", "message"), [
    (dict(local_budget="steps"),
     "train.local_budget=steps needs train.local_steps (the steps every client takes); "
     "it is unset. Fix: add e.g. train.local_steps=10, or set "
     "train.local_budget=epochs|steps_per_sample"),
    (dict(local_budget="steps_per_sample"),
     "train.local_budget=steps_per_sample needs train.steps_per_sample (a client takes "
     "ceil(steps_per_sample x its training samples) steps); it is unset. Fix: add e.g. "
     "train.steps_per_sample=0.03125 (one epoch at batch 32)"),
    (dict(steps_per_sample=0.05),
     "train.steps_per_sample=0.05 is read only with train.local_budget=steps_per_sample "
     "(now epochs). Fix: add train.local_budget=steps_per_sample, or drop "
     "train.steps_per_sample"),
    (dict(local_budget="steps_per_sample", steps_per_sample=0.0, batch_size=16),
     "train.steps_per_sample=0.0 is impossible: it must be > 0 (steps per training "
     "sample). Fix: e.g. train.steps_per_sample=0.0625 (one epoch at batch 16)"),
    (dict(local_budget="steps_per_sample", steps_per_sample=0.05, local_steps=10),
     "train.local_steps=10 with train.local_budget=steps_per_sample, which sets each "
     "client's steps from its data. Fix: drop train.local_steps, or set "
     "train.local_budget=steps"),
    (dict(local_budget="steps", local_steps=10, local_epochs=2),
     "train.local_epochs=2 is read only with train.local_budget=epochs (now steps). "
     "Fix: drop train.local_epochs, or set train.local_budget=epochs"),
    (dict(warmup_rounds=10),
     "train.warmup_rounds=10 is impossible with rounds=10: valid: 0 (off) to 9 "
     "(rounds - 1). Fix: e.g. train.warmup_rounds=3"),
    (dict(warmup_rounds=-1),
     "train.warmup_rounds=-1 is impossible with rounds=10: valid: 0 (off) to 9 "
     "(rounds - 1). Fix: e.g. train.warmup_rounds=3"),
])
def test_bad_budgets_are_refused_in_one_line_naming_the_fix(train, message) -> None:
    # Arrange
    cfg = _with(**train)

    # Act
    with pytest.raises(ConfigError) as info:
        validate(cfg)

    # Assert
    assert str(info.value) == message and "\n" not in message


@pytest.mark.parametrize("train", [
    dict(), dict(local_epochs=3), dict(local_steps=5, local_epochs=2),
    dict(local_budget="steps", local_steps=10), dict(warmup_rounds=9),
    dict(local_budget="steps_per_sample", steps_per_sample=0.05)])
def test_valid_budgets_validate(train) -> None:
    assert validate(_with(**train)).train == _with(**train).train


def test_the_budget_travels_as_its_value_and_decodes_to_the_enum() -> None:
    # Arrange
    cfg = _with(local_budget="steps_per_sample", steps_per_sample=0.05, warmup_rounds=2)

    # Act
    decoded = from_json(to_json(cfg))

    # Assert
    assert '"local_budget": "steps_per_sample"' in to_json(cfg)
    assert decoded.train.local_budget is LocalBudget.steps_per_sample
    assert (decoded.train.steps_per_sample, decoded.train.warmup_rounds) == (0.05, 2)
