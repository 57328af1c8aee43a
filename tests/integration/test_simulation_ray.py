"""End to end: a real Flower simulation on the Ray engine, 2 clients x 2 rounds, tiny data."""

from __future__ import annotations

import json

import pytest

from fedimg.simulate import run

pytestmark = pytest.mark.slow


def test_two_rounds_two_clients_through_ray(tmp_path) -> None:
    # Arrange: synthetic 4-class 32 px images, pretrained EfficientNet-Lite0, FedAvg.
    run_dir = tmp_path / "run"
    argv = ["scenario=medical", f"hydra.run.dir={run_dir}", "rounds=2", "clients=2",
            "data.source=synthetic", "data.image_size=32", "data.synthetic.train_size=192",
            "data.synthetic.test_size=64", "data.min_partition_size=8",
            "data.partitioner=iid", "data.quantity_skew=0", "train.lr=0.02",
            "train.local_epochs=2", "train.batch_size=16", "sim.ray_num_cpus=2", "output.progress=false"]
    # Act
    results = run(argv)
    # Assert: the outputs exist ...
    for name in ("config.yaml", "config.json", "metrics.jsonl", "results.json", "run.log",
                 "partitions.npz", "checkpoints/final.pt", "checkpoints/best.pt",
                 "plots/accuracy_loss.png", "plots/client_accuracy.png",
                 "plots/label_distribution.png"):
        assert (run_dir / name).is_file(), name
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # ... both clients trained and were evaluated in every round, with their bytes counted ...
    for r in rounds[1:]:
        assert r["fleet/ok"] == 2 and r["fleet/failed"] == 0
        assert set(r["clients"]) == {"0", "1"}
        assert r["bytes/up"] > 0 and r["bytes/down"] > r["bytes/up"]
    # ... and the global model improved: central test loss fell below the initial model's.
    assert rounds[2]["test/loss"] < rounds[0]["test/loss"]
    assert rounds[2]["train/last_loss"] < rounds[1]["train/first_loss"]
    assert results["data"]["source"] == "synthetic"
    assert json.loads((run_dir / "results.json").read_text())["final"]["round"] == 2


def test_client_sampling_is_seeded(tmp_path, tiny_overrides) -> None:
    # Arrange: 4 clients, half of them sampled per round, same seed twice.
    def sampled(run_dir) -> list[list[str]]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [sorted(c for c, v in json.loads(x)["clients"].items() if "train" in v)
                for x in lines[1:]]

    argv = [*tiny_overrides, "rounds=3", "clients=4", "fl.fraction_train=0.5",
            "fl.fraction_evaluate=0.5", "data.synthetic.train_size=128"]
    # Act
    run([*argv, f"hydra.run.dir={tmp_path / 'a'}"])
    run([*argv, f"hydra.run.dir={tmp_path / 'b'}"])
    # Assert: 2 of 4 clients per round, the same ones in both runs
    first, second = sampled(tmp_path / "a"), sampled(tmp_path / "b")
    assert all(len(r) == 2 for r in first)
    assert first == second
    assert len({tuple(r) for r in first}) > 1  # reseeded per round, not one fixed pair
