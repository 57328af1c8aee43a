"""A client's own site's test rows, and its personalised model scored on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.clientapp.environment import TaskEnvironment
from fedimg.clientapp.personal import personal_metrics
from fedimg.config.compose import compose_config
from fedimg.data.partition import ClientPartition
from fedimg.data.types import Dataset, ImageSet, Provenance
from fedimg.training import evaluate

TINY = ["clients=3", "data.image_size=16", "weights=none", "model=mobilenet_v3_small",
        "fl.personal=ditto"]


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def _env() -> TaskEnvironment:
    """12 training rows (sites a, b), 6 test rows (sites a, b, c); clients 0 = a, 1 = b,
    2 = one row of each (not one site)."""
    train = ImageSet(_images(12, 0), torch.tensor([0, 1] * 6),
                     {"site": np.array(["a"] * 6 + ["b"] * 6)})
    test = ImageSet(_images(6, 1), torch.tensor([0, 1, 1, 0, 1, 0]),
                    {"site": np.array(["a", "b", "a", "c", "b", "a"])})
    dataset = Dataset("folder", ("x", "y"), 3, train, test, None, Provenance(source="real", location="memory"))
    parts = [ClientPartition(0, np.arange(5), np.array([5])),
             ClientPartition(1, np.arange(6, 11), np.array([11])),
             ClientPartition(2, np.array([0, 6]), np.array([], dtype=np.int64))]
    return TaskEnvironment(compose_config("medical", TINY), dataset=dataset, partitions=parts)


def test_a_client_of_one_site_gets_that_sites_test_rows_and_a_mixed_one_none() -> None:
    env = _env()
    assert env.site_test(0).indices.tolist() == [0, 2, 5]
    assert env.site_test(1).indices.tolist() == [1, 4]
    assert env.site_test(2) is None  # rows of two sites: no site of its own


def test_the_personal_model_is_scored_on_its_sites_test_rows() -> None:
    # Arrange: client 1's own site (b) holds test rows 1 and 4
    env = _env()
    # Act
    metrics = personal_metrics(env, 1, kept=None)
    # Assert: the same figures as the model evaluated on those two rows directly
    want = evaluate(env.model, env.site_test(1), device=env.device, num_classes=2)
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert metrics[f"test/personal/{key}"] == pytest.approx(want[key], nan_ok=True)
    assert "val/personal_accuracy" in metrics
