"""TensorBoard and MLflow hold the numbers metrics.jsonl holds; a failing tracker never stops a run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from fedimg.config import FedimgConfig
from fedimg.reporting import RunRecorder
from fedimg.reporting.trackers import round_scalars

ROUNDS = [
    {"round": 0, "test/accuracy": 0.5, "test/loss": 0.75, "wall_s": 1.0, "clients": {}},
    {"round": 1, "train/loss": 0.625, "test/accuracy": 0.75, "test/auc": math.nan,
     "test/site/north/auc": 0.875, "fleet/ok": 2, "skipped": False, "wall_s": 3.0,
     "clients": {"0": {"train": {"train/loss": 0.5}, "val": {"val/accuracy": 0.625},
                       "train_status": "ok"}}},
]


def _config(**output: object) -> FedimgConfig:
    cfg = FedimgConfig(seed=3)
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, **output))


def _recorded(tmp_path: Path, cfg: FedimgConfig) -> RunRecorder:
    recorder = RunRecorder(tmp_path / "run")
    recorder.write_config(cfg)
    for record in ROUNDS:
        recorder.append_round(record)
    recorder.write_results({"final": {}})
    return recorder


def _expected(recorder: RunRecorder) -> dict[tuple[str, int], float]:
    return {(tag, r["round"]): value for r in recorder.read_rounds()
            for tag, value in round_scalars(r)}


def test_scalars_are_the_finite_numbers_of_a_record_and_its_clients() -> None:
    assert dict(round_scalars(ROUNDS[1])) == {
        "train/loss": 0.625, "test/accuracy": 0.75, "test/site/north/auc": 0.875,
        "fleet/ok": 2.0, "wall_s": 3.0, "client/0/train/loss": 0.5,
        "client/0/val/accuracy": 0.625}


def test_the_tensorboard_events_hold_the_numbers_of_metrics_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Arrange / Act
    recorder = _recorded(tmp_path, _config())
    events = EventAccumulator(str(recorder.run_dir))
    events.Reload()
    # Assert: every scalar, at its round, equal up to float32
    found = {(tag, e.step): e.value for tag in events.Tags()["scalars"]
             for e in events.Scalars(tag)}
    expected = _expected(recorder)
    assert set(found) == set(expected) and len(found) == 10
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, rel=1e-6)


def test_mlflow_logs_params_metrics_per_round_and_artifacts(tmp_path: Path) -> None:
    mlflow = pytest.importorskip("mlflow")
    # Arrange / Act
    recorder = _recorded(tmp_path, _config(mlflow=True, tensorboard=False))
    # Assert
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("custom").experiment_id])
    assert run.data.params["seed"] == "3" and run.data.params["train.lr"] == "0.01"
    history = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75)]
    assert run.data.metrics["client/0/val/accuracy"] == 0.625
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "config.json", "results.json"} <= artifacts
    assert run.info.status == "FINISHED"


def test_a_tracker_that_cannot_start_is_a_warning_not_a_failed_run(tmp_path: Path,
                                                                   caplog) -> None:
    # Arrange: a tracking URI nothing can serve
    cfg = _config(mlflow=True, tensorboard=False, mlflow_uri="nosuchscheme://x")
    # Act
    recorder = _recorded(tmp_path, cfg)
    # Assert
    assert "MLflow tracking is off for this run" in caplog.text
    assert [json.loads(line)["round"] for line in
            recorder.metrics_path.read_text().splitlines()] == [0, 1]
