"""Run directory files, the summary table and plots drawn from files."""

from __future__ import annotations

import json
import math

import torch

from fedimg.config import FedimgConfig
from fedimg.reporting import RunRecorder, plot_run, summary_table
from fedimg.reporting.run_dir import write_json

ROUNDS = [
    {"round": 0, "test/accuracy": 0.5, "test/loss": 0.7, "wall_s": 1.0, "clients": {}},
    {"round": 1, "train/loss": 0.6, "val/accuracy": 0.7, "test/accuracy": 0.75,
     "test/loss": 0.5, "test/auc": float("nan"), "fleet/ok": 2, "wall_s": 3.0,
     "clients": {"0": {"val": {"val/accuracy": 0.6}}, "1": {"val": {"val/accuracy": 0.8}}}},
]


def test_rounds_are_appended_as_jsonl_with_nan_as_null(tmp_path) -> None:
    recorder = RunRecorder(tmp_path)
    recorder.write_config(FedimgConfig(seed=7))
    for record in ROUNDS:
        recorder.append_round(record)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1])["test/auc"] is None
    assert [r["round"] for r in recorder.read_rounds()] == [0, 1]
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7
    assert "torch" in json.loads((tmp_path / "config.json").read_text())["versions"]


def test_checkpoint_round_trip_and_no_temp_files_left(tmp_path) -> None:
    recorder = RunRecorder(tmp_path)
    state = {"w": torch.arange(3.0)}
    path = recorder.save_checkpoint("best", state, {"round": 3})
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], state["w"])
    assert loaded["meta"] == {"round": 3}
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]


def test_summary_table_has_one_row_per_round(tmp_path) -> None:
    results = {"final": {"test/accuracy": 0.75, "test/auc": math.nan}, "rounds": 1,
               "best": {"test/accuracy": 0.75, "round": 1},
               "data": {"source": "real", "location": "/x"}, "run_dir": str(tmp_path)}
    table = summary_table(ROUNDS, results)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["round", "train"]
    assert lines[3].split()[:5] == ["1", "0.6000", "0.7000", "0.5000", "0.7500"]
    assert "final  test acc 0.7500  auc -  (round 1)" in table


def test_the_summary_names_the_worst_site_with_mean_and_spread(tmp_path) -> None:
    # Arrange: three sites' balanced accuracies, one of them NaN (a one-class site)
    final = {"test/accuracy": 0.7, "test/site/north/balanced_accuracy": 0.8,
             "test/site/south/balanced_accuracy": 0.6, "test/site/east/balanced_accuracy":
             math.nan, "test/site/south/accuracy": 0.1}
    # Act
    table = summary_table(ROUNDS, {"final": final, "best": {}, "run_dir": str(tmp_path)})
    # Assert: worst 0.6 (south), mean (0.8 + 0.6) / 2, spread 0.2
    assert ("sites  test bal acc worst 0.6000 (south)  mean 0.7000  spread 0.2000  "
            "over 2 sites") in table


def test_the_summary_puts_the_personal_models_beside_the_global_one(tmp_path) -> None:
    # Arrange: fl.personal=fedrep; the clients' own heads beat the global (initial) head
    final = {"val/accuracy": 0.5, "fair/worst_accuracy": 0.25,
             "val/personal_accuracy": 0.875, "fair/worst_personal_accuracy": 0.75}
    # Act
    table = summary_table(ROUNDS, {"final": final, "best": {}, "personal": "fedrep",
                                   "run_dir": str(tmp_path)})
    # Assert
    assert ("personal fedrep  val acc mean 0.8750  worst client 0.7500  (global model: "
            "mean 0.5000  worst 0.2500)") in table
    assert "personal" not in summary_table(ROUNDS, {"final": final, "best": {},
                                                    "run_dir": str(tmp_path)})


def test_plots_are_drawn_from_files_and_flag_fallback_data(tmp_path) -> None:
    recorder = RunRecorder(tmp_path)
    for record in ROUNDS:
        recorder.append_round(record)
    write_json(tmp_path / "partitions.json", {"classes": ["a", "b"], "partitioner": "iid",
                                              "label_counts": [[3, 1], [0, 4]]})
    recorder.write_results({"data": {"dataset": "x", "source": "synthetic-fallback"}})
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["accuracy_loss.png", "client_accuracy.png",
                                              "label_distribution.png"]
    assert all(p.stat().st_size > 5000 for p in written)
