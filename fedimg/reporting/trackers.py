"""Experiment trackers: every round also goes to TensorBoard, and to MLflow if asked.

* :class:`TensorBoardTracker` (``output.tensorboard``, on by default): the run directory
  is a TensorBoard log directory (``tensorboard --logdir runs/``). Each round's numeric
  metrics are scalars at step = round, under their metric keys (``test/accuracy``,
  ``test/site/<name>/auc``, ``fair/worst_accuracy``, ``dp/epsilon``, ``bytes/up``...),
  and every client's under ``client/<id>/<key>``. Written with torch's own
  ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package).
* :class:`MlflowTracker` (``output.mlflow=true``; ``pip install -e ".[mlflow]"``): one
  MLflow run per fedimg run with the resolved config as params, the same metrics per
  round, and the run directory as artifacts at the end. ``output.mlflow_uri`` names the
  tracking server or store; by default a local SQLite store beside the run folders
  (``<runs>/mlflow.db``, artifacts in ``<runs>/mlartifacts``): MLflow 3 refuses its
  old file store unless told otherwise. View it with
  ``mlflow ui --backend-store-uri sqlite:///runs/medical/mlflow.db``.

A tracker that fails (a tracking server down) logs one warning and stops tracking; it
never stops the run: metrics.jsonl is the record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from fedimg.config import FedimgConfig, to_dict

log = logging.getLogger(__name__)

SKIP = frozenset({"round", "attempts", "skipped", "stopped"})


def round_scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of every finite number in a metrics.jsonl record."""
    for key, value in record.items():
        if key not in SKIP and _number(value):
            yield key, float(value)
    for cid, entry in (record.get("clients") or {}).items():
        for section in entry.values() if isinstance(entry, dict) else ():
            if not isinstance(section, dict):
                continue
            for key, value in section.items():
                if _number(value):
                    yield f"client/{cid}/{key}", float(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _flat(section: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"train.lr": "0.01", ...}`` (MLflow params are strings)."""
    if not isinstance(section, dict):
        return {prefix.rstrip("."): str(section)[:6000]}
    out: dict[str, str] = {}
    for key, value in section.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


class Tracker(Protocol):
    """Something that sees every round and the end of a run."""

    def add_round(self, record: dict[str, Any]) -> None: ...

    def finish(self, results: dict[str, Any]) -> None: ...


class TensorBoardTracker:
    """The run directory as a TensorBoard log directory."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(run_dir))

    def add_round(self, record: dict[str, Any]) -> None:
        step = int(record.get("round", 0))
        for tag, value in round_scalars(record):
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def finish(self, results: dict[str, Any]) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fedimg run: params, metrics per round, artifacts at the end."""

    def __init__(self, cfg: FedimgConfig, run_dir: Path) -> None:
        import mlflow  # the optional extra: pip install -e ".[mlflow]"

        self.mlflow, self.run_dir = mlflow, run_dir
        store = run_dir.parent
        mlflow.set_tracking_uri(cfg.output.mlflow_uri or f"sqlite:///{store / 'mlflow.db'}")
        experiment = mlflow.get_experiment_by_name(cfg.name)
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
            cfg.name, artifact_location=(store / "mlartifacts").as_uri())
        self.run = mlflow.start_run(experiment_id=experiment_id, run_name=run_dir.name)
        params = _flat(to_dict(cfg))
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            mlflow.log_params(dict(list(params.items())[start:start + 100]))

    def add_round(self, record: dict[str, Any]) -> None:
        metrics = {k.replace("@", "_at_"): v for k, v in round_scalars(record)}
        self.mlflow.log_metrics(metrics, step=int(record.get("round", 0)))

    def finish(self, results: dict[str, Any]) -> None:
        self.mlflow.log_artifacts(str(self.run_dir))
        self.mlflow.end_run()


class Trackers:
    """The run's trackers; one that raises is dropped with a warning, never the run."""

    def __init__(self, cfg: FedimgConfig, run_dir: Path) -> None:
        self.active: list[Tracker] = []
        makers = [("TensorBoard", lambda: TensorBoardTracker(run_dir), cfg.output.tensorboard),
                  ("MLflow", lambda: MlflowTracker(cfg, run_dir), cfg.output.mlflow)]
        for name, make, wanted in makers:
            if wanted:
                self._call(name, make)

    def _call(self, name: str, action: Any) -> None:
        try:
            made = action()
        except Exception as exc:  # noqa: BLE001 - a tracker never stops a run
            log.warning("%s tracking is off for this run: %s: %s", name, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            return
        if made is not None:
            self.active.append(made)

    def add_round(self, record: dict[str, Any]) -> None:
        for tracker in list(self.active):
            self._guard(tracker, lambda t=tracker: t.add_round(record))

    def finish(self, results: dict[str, Any]) -> None:
        for tracker in list(self.active):
            self._guard(tracker, lambda t=tracker: t.finish(results))

    def _guard(self, tracker: Tracker, action: Any) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001
            log.warning("%s failed and is dropped: %s: %s", type(tracker).__name__,
                        type(exc).__name__, exc)
            self.active.remove(tracker)
