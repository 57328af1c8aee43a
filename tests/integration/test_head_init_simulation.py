"""fl.head_init=ridge in a real Ray simulation: one class per client, the pooled head."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_fault_tolerance import TINY

from fedimg.baselines import union
from fedimg.build import initial_model
from fedimg.clientapp.environment import TaskEnvironment
from fedimg.config.compose import compose_config
from fedimg.serverapp.evaluation import CentralEvaluator
from fedimg.simulate import run
from fedimg.training.closed_form import ridge_head

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ONE_CLASS = ["data.partitioner=shards", "data.classes_per_client=1", "transfer.mode=head",
             "fl.head_init=ridge", "rounds=1"]
WEIGHTED = ["train.class_weighting=federated", "train.local_steps=1"]


@pytest.mark.parametrize("cohort", ["sim.cohort_size=1", "sim.cohort_size=3"],
                         ids=["lone", "cohort"])
def test_clients_holding_one_class_each_start_from_the_pooled_ridge_head(tmp_path,
                                                                        cohort) -> None:
    """Also federated class weights: each one-class client weighs its loss by the
    union's n / (K n_c), where its own counts would give 1. With ``sim.cohort_size=3``
    the query (and training) goes to the three clients in one message."""
    # Arrange: the ridge head of every training image at once, computed in-process
    cfg = compose_config(overrides=[*TINY, *ONE_CLASS, *WEIGHTED])
    env = TaskEnvironment(cfg)
    pooled = TaskEnvironment(cfg, partitions=[union(env.partitions)], dataset=env.dataset)
    state = initial_model(cfg, env.num_classes)[0]
    pooled.load_state(state)
    stats = pooled.head_statistics(0)
    weight, bias = ridge_head(stats, relative_lambda=cfg.fl.ridge_lambda)
    want = CentralEvaluator(cfg, env.dataset)({**state, "_fc.weight": weight, "_fc.bias": bias})
    labels = [set(env.dataset.train.labels[p.train_indices].tolist()) for p in env.partitions]
    unweighted = _first_losses(env, {**state, "_fc.weight": weight, "_fc.bias": bias})
    counts = torch.bincount(env.dataset.train.labels[union(env.partitions).train_indices])
    # Act: the federation of one-class clients
    run([*TINY, *ONE_CLASS, *WEIGHTED, cohort, f"hydra.run.dir={tmp_path}"])
    # Assert: each client held one class; round 0 is the pooled head's evaluation
    assert all(len(held) == 1 for held in labels)
    assert stats.count == sum(len(p.train_indices) for p in env.partitions)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["round"] == 0
    assert first["test/loss"] == pytest.approx(want["test/loss"], rel=1e-5)
    assert first["test/accuracy"] == pytest.approx(want["test/accuracy"], abs=1e-9)
    assert torch.isfinite(weight).all()
    # Each client's one step: its class's federated weight times the unweighted loss
    clients = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["clients"]
    for pid, held in enumerate(labels):
        (c,) = held
        w = float(counts.sum() / (len(counts) * counts[c]))
        assert w != pytest.approx(1.0)
        assert clients[str(pid)]["train"]["train/first_loss"] == \
            pytest.approx(w * unweighted[pid], rel=1e-4)
    # Clients holding different classes report different per-class validation counts;
    # none is rejected for it, and the pooled figure sums every client's
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rejected_updates"] == {}
    assert all("val" in clients[str(pid)] for pid in range(len(labels)))
    second = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert 0.0 <= second["val/pooled_balanced_accuracy"] <= 1.0


def _first_losses(env: TaskEnvironment, state: dict[str, torch.Tensor]) -> list[float]:
    """Each client's loss on its first batch from ``state``, with no class weights."""
    plain = TaskEnvironment(replace(env.cfg, train=replace(env.cfg.train,
                                                         class_weighting="none")),
                            partitions=env.partitions, dataset=env.dataset)
    losses = []
    for pid in range(len(env.partitions)):
        plain.load_state(state)
        metrics, _ = plain.train(pid, server_round=1)
        losses.append(metrics["train/first_loss"])
    return losses
