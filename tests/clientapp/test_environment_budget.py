"""A real client round under each ``train.local_budget`` reports the steps it took."""

from __future__ import annotations

import numpy as np
import pytest

from fedimg.clientapp.environment import TaskEnvironment
from fedimg.config.compose import compose_config
from fedimg.data import ClientPartition

SITES = (16, 100, 440)  # training samples per client, at batch 32


def _partitions() -> list[ClientPartition]:
    """Three clients of 16, 100 and 440 training images and 2 validation images each."""
    parts, start = [], 0
    for cid, n in enumerate(SITES):
        parts.append(ClientPartition(cid, np.arange(start, start + n),
                                     np.arange(start + n, start + n + 2)))
        start += n + 2
    return parts


@pytest.mark.parametrize(("budget", "expected"), [
    ((), [1, 4, 14]),  # epochs: ceil(n / 32)
    (("train.local_budget=steps", "train.local_steps=10"), [10, 10, 10]),
    (("train.local_budget=steps_per_sample", "train.steps_per_sample=0.05"), [1, 5, 22]),
], ids=["epochs", "steps", "steps_per_sample"])
def test_each_budget_reports_its_steps_as_train_steps(budget, expected, tmp_path,
                                                       tiny_overrides) -> None:
    # Arrange: a frozen-trunk head on cached features, so each step is a small matmul
    cfg = compose_config("medical", [
        f"hydra.run.dir={tmp_path}", *tiny_overrides, "clients=3",
        "data.synthetic.train_size=562", "data.image_size=32", "data.augment=none",
        "model=mobilenet_v3_small", "transfer.mode=head", "train.batch_size=32", *budget])
    env = TaskEnvironment(cfg, num_threads=1, partitions=_partitions())

    # Act
    steps = [env.train(pid, server_round=1)[0]["train/steps"] for pid in range(3)]

    # Assert: what the client reports (FedNova reads it) is what it planned
    assert steps == [float(s) for s in expected]
    assert [env.local_steps(pid) for pid in range(3)] == expected
