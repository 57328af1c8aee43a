"""Private federations end to end on the Ray engine: DP-SGD clients and client-level DP."""

from __future__ import annotations

import json

import pytest

from fedimg.resolve import compose_and_check
from fedimg.data import load_dataset, partition_dataset
from fedimg.privacy.accounting import epsilon
from fedimg.simulate import run

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def _rounds(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _argv(tmp_path, tiny_overrides, *extra: str) -> list[str]:
    return [*tiny_overrides, "rounds=3", "model=mobilenet_v3_small", "weights=none",
            "train.batch_size=16", "train.local_steps=2", "data.synthetic.train_size=128",
            "sim.ray_num_cpus=2", "train.class_weighting=none",
            f"hydra.run.dir={tmp_path / 'run'}", *extra]


def test_dp_sgd_epsilon_accumulates_across_rounds_and_a_spent_client_stops(
        tmp_path, tiny_overrides) -> None:
    # Arrange: sigma=1; client 1's budget lies between its 1-round and 2-round epsilon,
    # client 0's budget is ample.
    argv = _argv(tmp_path, tiny_overrides, "privacy=dp_sgd", "privacy.noise_multiplier=1.0")
    cfg = compose_and_check("medical", argv)
    parts = partition_dataset(load_dataset(cfg.data, seed=0).train, cfg=cfg.data,
                              num_clients=2, seed=0)
    n1 = len(parts[1].train_indices)
    one, two = (epsilon([(1.0, 16 / n1, k)], 0.1 / n1, "prv") for k in (2, 4))
    # Act
    results = run([*argv, f"privacy.client_epsilons=[100,{(one + two) / 2}]"])
    rounds = _rounds(tmp_path / "run")
    # Assert: client 0 trains every round with a rising epsilon kept in context.state ...
    eps0 = [r["clients"]["0"]["train"]["dp/epsilon"] for r in rounds[1:]]
    assert eps0[0] < eps0[1] < eps0[2]
    # ... client 1 trains round 1 only, then declines; the server goes on without it
    assert rounds[1]["fleet/ok"] == 2 and rounds[1]["fleet/declined"] == 0
    for r in rounds[2:]:
        assert r["fleet/ok"] == 1 and r["fleet/declined"] == 1
        assert r["clients"]["1"]["train_status"].startswith("declined: privacy budget")
    summary = results["privacy"]["clients"]
    assert summary["1"]["stopped_round"] == 2 and summary["0"]["stopped_round"] is None
    assert summary["1"]["dp/epsilon"] == pytest.approx(one, rel=1e-6)
    assert results["stopped_early"] is None and results["final"]["round"] == 3


def test_client_level_dp_records_epsilon_and_stops_before_the_budget(
        tmp_path, tiny_overrides) -> None:
    # Arrange: both clients every round (q=1), sigma=2; the budget allows two releases
    one, two, three = (epsilon([(2.0, 1.0, k)], 0.05, "rdp") for k in (1, 2, 3))
    argv = _argv(tmp_path, tiny_overrides, "privacy=client_dp", "privacy.noise_multiplier=2.0",
                 f"privacy.target_epsilon={(two + three) / 2}", "privacy.clipping_norm=0.01")
    # Act
    results = run(argv)
    rounds = _rounds(tmp_path / "run")
    # Assert: epsilon recorded each round, equal to the accountant's; round 3 is
    # recorded as the one the run stopped in, with no third release
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[3]["stopped"] and rounds[3]["dp/epsilon"] == pytest.approx(two)
    assert rounds[1]["dp/epsilon"] == pytest.approx(one, rel=1e-6)
    assert rounds[2]["dp/epsilon"] == pytest.approx(two, rel=1e-6)
    assert rounds[2]["dp/sample_rate"] == 1.0 and rounds[2]["dp/delta"] == 0.05
    assert "epsilon would reach" in results["stopped_early"]
    assert results["privacy"]["server"]["dp/epsilon"] == pytest.approx(two, rel=1e-6)
