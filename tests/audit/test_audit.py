"""Audit helpers: which (epsilon, delta) a run guarantees, and the membership pool."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedimg.data import ClientPartition
from fedimg.errors import DataError
from fedimg.audit.run_audit import _pool, run_guarantee


def test_run_guarantee_is_the_weakest_client_or_the_server() -> None:
    clients = {"privacy": {"clients": {"0": {"dp/epsilon": 0.9, "dp/delta": 1e-4},
                                       "1": {"dp/epsilon": 1.0, "dp/delta": 2e-4}}}}
    server = {"privacy": {"server": {"dp/epsilon": 3.0, "dp/delta": 0.02},
                          "clients": {}}}
    assert run_guarantee(clients) == (1.0, 2e-4)
    assert run_guarantee(server) == (3.0, 0.02)
    assert run_guarantee({"privacy": {"clients": {}, "server": {}}}) == (math.inf, 0.0)


class _Split:
    def __init__(self, n: int) -> None:
        self.images = torch.arange(n).view(n, 1, 1, 1).expand(n, 1, 2, 2).to(torch.uint8)
        self.labels = torch.arange(n) % 2


class _Data:
    train = _Split(40)


def _part(train: list[int], val: list[int]) -> ClientPartition:
    return ClientPartition(client_id=0, train_indices=np.array(train), val_indices=np.array(val))


def test_pool_members_from_train_splits_non_members_from_validation_splits() -> None:
    parts = [_part(list(range(0, 15)), [15, 16, 17]), _part(list(range(20, 35)), [35, 36])]
    images, labels, member = _pool(_Data(), parts, size=10, seed=0)
    ids = images[:, 0, 0, 0].long()
    # Assert: 5 of each (capped by the 5 validation images), from the right splits
    assert member.tolist() == [True] * 5 + [False] * 5
    assert set(ids[:5].tolist()) <= set(range(0, 15)) | set(range(20, 35))
    assert sorted(ids[5:].tolist()) == [15, 16, 17, 35, 36]
    assert torch.equal(labels, ids % 2)
    with pytest.raises(DataError, match="validation splits are empty"):
        _pool(_Data(), [_part(list(range(10)), [])], size=10, seed=0)
