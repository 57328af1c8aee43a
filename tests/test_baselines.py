"""Pooled and local-only baselines: the union, the same budget, no exchange of weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedimg.baselines import BaselineRun, best_round, check_baseline, run_baseline, union
from fedimg.build import prepare_run
from fedimg.clientapp.environment import TaskEnvironment
from fedimg.errors import ConfigError
from fedimg.resolve import compose_and_check

SMALL = ["data.dataset=synthetic", "data.source=synthetic", "model=mobilenet_v3_small",
         "weights=none", "data.image_size=16", "data.synthetic.train_size=96",
         "data.synthetic.test_size=24", "data.partitioner=iid", "clients=3", "rounds=2",
         "train.local_epochs=1", "train.batch_size=8", "output.progress=false",
         "output.plots=false", "data.min_partition_size=4"]


def _prepared(tmp_path: Path, strategy: str, *extra: str):
    cfg = compose_and_check("medical", [*SMALL, f"strategy={strategy}",
                                        f"hydra.run.dir={tmp_path / strategy}", *extra])
    return prepare_run(cfg)


def test_pooled_trains_on_exactly_the_union_with_the_federations_steps(tmp_path) -> None:
    # Arrange
    prepared = _prepared(tmp_path, "pooled")
    parts = prepared.partitions
    # Act
    run = BaselineRun(prepared)
    # Assert: one model on every site's train indices; steps = sum of the sites' steps
    [trainee] = run.trainees
    pooled = run.env.partitions[trainee.partition]
    every = np.sort(np.concatenate([p.train_indices for p in parts]))
    assert np.array_equal(np.sort(pooled.train_indices), every)
    steps = [run.env.local_steps(k) for k in range(len(parts))]
    assert trainee.steps == sum(steps) and trainee.steps == sum(
        -(-len(p.train_indices) // 8) for p in parts)


def test_pooled_steps_scale_with_the_share_of_sites_sampled(tmp_path) -> None:
    prepared = _prepared(tmp_path, "pooled", "fl.fraction_train=0.34",
                         "fl.min_train_clients=1")
    run = BaselineRun(prepared)
    steps = [run.env.local_steps(k) for k in range(3)]
    assert run.trainees[0].steps == round(sum(steps) * 1 / 3)  # int(3 * 0.34) = 1 of 3


def test_local_sites_never_exchange_weights(tmp_path) -> None:
    # Arrange
    prepared = _prepared(tmp_path, "local")
    # Act
    results = run_baseline(prepared)
    # Assert: site 1's final model is what training site 1 alone, round by round, gives
    env = TaskEnvironment(prepared.cfg, partitions=prepared.partitions)
    env.load_state(prepared.initial_state)
    for server_round in (1, 2):
        env.train(1, server_round=server_round)
    saved = torch.load(tmp_path / "local" / "checkpoints" / "final_client1.pt",
                       weights_only=True)["state_dict"]
    for key, value in env.state().items():
        assert torch.equal(saved[key], value), key
    records = [json.loads(line) for line in
               (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    tests = [records[-1]["clients"][str(k)]["test"]["test/accuracy"] for k in range(3)]
    assert records[-1]["test/accuracy"] == pytest.approx(np.mean(tests))
    assert results["final"]["fleet/ok"] == 3 and results["bytes"] == {"down": 0, "up": 0}


def test_a_ridge_head_starts_pooled_from_the_union_and_local_from_each_site(tmp_path) -> None:
    # Arrange: the closed-form head of the union, and of site 0 alone
    from fedimg.build import initial_model
    from fedimg.training.closed_form import ridge_head

    pooled = BaselineRun(_prepared(tmp_path, "pooled", "fl.head_init=ridge"))
    local = BaselineRun(_prepared(tmp_path, "local", "fl.head_init=ridge"))
    env, cfg = pooled.env, pooled.prepared.cfg
    env.load_state(initial_model(cfg, env.num_classes)[0])
    parts = pooled.prepared.partitions
    union_stats = env.head_statistics(0) + env.head_statistics(1) + env.head_statistics(2)
    want_union = ridge_head(union_stats, relative_lambda=cfg.fl.ridge_lambda)
    want_site0 = ridge_head(env.head_statistics(0), relative_lambda=cfg.fl.ridge_lambda)
    # Act / Assert: the sums of the sites are the union's head; site 0 has its own
    head = "classifier.3"  # mobilenet_v3_small's last Linear
    got = pooled.states["pooled"]
    assert union_stats.count == sum(len(p.train_indices) for p in parts)
    close = {"rtol": 1e-4, "atol": 0.0}  # the weights are small here: compare relatively
    torch.testing.assert_close(got[f"{head}.weight"], want_union[0], **close)
    torch.testing.assert_close(got[f"{head}.bias"], want_union[1], **close)
    first = local.states[local.trainees[0].name]
    torch.testing.assert_close(first[f"{head}.weight"], want_site0[0], **close)
    apart = (first[f"{head}.weight"] - got[f"{head}.weight"]).norm()
    assert apart > 0.05 * got[f"{head}.weight"].norm()


def test_baselines_refuse_dp_and_resume(tmp_path) -> None:
    prepared = _prepared(tmp_path, "pooled")
    with pytest.raises(ConfigError, match="strategy=pooled with resume"):
        check_baseline(prepared, resume=True)
    dp = _prepared(tmp_path, "local", "privacy=dp_sgd")
    with pytest.raises(ConfigError, match="strategy=local with privacy=dp_sgd"):
        check_baseline(dp, resume=False)


def test_union_and_best_round_by_hand() -> None:
    from fedimg.data import ClientPartition

    parts = [ClientPartition(0, np.array([0, 1]), np.array([5])),
             ClientPartition(1, np.array([2]), np.array([6, 7]))]
    merged = union(parts)
    assert merged.train_indices.tolist() == [0, 1, 2] and merged.val_indices.tolist() == [5, 6, 7]
    rounds = [{"round": 1, "m": 0.5}, {"round": 2, "m": float("nan")}, {"round": 3, "m": 0.7},
              {"round": 4, "m": 0.7, "clients": {}}]
    assert best_round(rounds, "m") == {"round": 3, "m": 0.7}
