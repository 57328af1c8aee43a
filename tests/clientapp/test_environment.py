"""The per-process client task: caching, class weights, and a shared model per worker."""

from __future__ import annotations

import pytest
import torch

from fedimg.config.compose import compose_config
from fedimg.config import to_json
from fedimg.clientapp.environment import TaskEnvironment, environment
from fedimg.training import balanced_class_weights


def test_balanced_class_weights_by_hand() -> None:
    # 3 of class 0, 1 of class 1, none of class 2: n / (k * n_c) with k = 2 present.
    weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]), 3)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0, 1.0]))
    # The mean weight per sample stays 1: (3 * 2/3 + 1 * 2) / 4.
    assert float((3 * weights[0] + weights[1]) / 4) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, tiny_overrides):
    run_dir = tmp_path_factory.mktemp("task")
    return compose_config("medical", [f"hydra.run.dir={run_dir}", *tiny_overrides,
                                      "train.batch_size=16", "train.lr=0.02",
                                      "train.class_weighting=balanced"])


def test_environment_is_built_once_per_config(tiny_cfg) -> None:
    first = environment(to_json(tiny_cfg), 1)
    assert environment(to_json(tiny_cfg), 1) is first
    assert first.client(0) is first.client(0)  # loaders cached too


def test_shared_model_serves_clients_without_leaking_state(tiny_cfg) -> None:
    # Arrange: one environment (one model object) serving two clients in turn.
    env = TaskEnvironment(tiny_cfg, num_threads=1)
    start = env.state()
    # Act: client 0 trains; then the same global weights are loaded for client 1.
    env.load_state(start)
    metrics, n0 = env.train(0, server_round=1)
    after_client0 = env.state()
    env.load_state(start)
    # Assert: client 1 starts exactly from the global weights, not from client 0's.
    assert all(torch.equal(env.state()[k], start[k]) for k in start)
    assert any(not torch.equal(after_client0[k], start[k]) for k in start)
    assert n0 == env.client(0).num_train and metrics["train/steps"] >= 1
    assert env.client(0).class_weights is not None


def test_same_round_and_client_give_the_same_update(tiny_cfg) -> None:
    env = TaskEnvironment(tiny_cfg, num_threads=1)
    start = env.state()
    updates = []
    for _ in range(2):
        env.load_state(start)
        env.train(1, server_round=1)
        updates.append(env.state())
    assert all(torch.equal(updates[0][k], updates[1][k]) for k in start)
