"""The run directory: resolved config, per-round metrics, results and checkpoints.

Which file is where: :class:`fedimg.reporting.paths.RunPaths`.

Files that are replaced (results, checkpoints) are written atomically: a crash
while writing never leaves a half-written file in place of the last good one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from fedimg.config import FedimgConfig, to_dict
from fedimg.reporting.paths import RunPaths
from fedimg.reporting.trackers import Trackers

_LIBRARIES = ("fedimg", "flwr", "ray", "torch", "torchvision", "opacus", "numpy",
              "flwr-datasets", "hydra-core")


def library_versions(names: Sequence[str] = _LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries a result depends on."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (NaN written as null)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True)
    _atomic_write(path, lambda h: h.write(text.encode()))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (empty if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunRecorder:
    """Writes everything a run leaves behind into its own directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.paths = RunPaths(self.run_dir)
        self.metrics_path = self.paths.metrics
        self.trackers: Trackers | None = None  # TensorBoard, MLflow: from write_config on

    def write_config(self, cfg: FedimgConfig, *, keep_metrics: bool = False) -> None:
        """Write the resolved config; start an empty metrics.jsonl unless ``keep_metrics``."""
        resolved = to_dict(cfg)
        meta = {"seed": cfg.seed, "versions": library_versions()}
        (self.paths.config_yaml).write_text(
            yaml.safe_dump(resolved, sort_keys=False) + "\n# " + json.dumps(meta) + "\n")
        write_json(self.paths.config_json, {"config": resolved, **meta})
        if not keep_metrics:
            self.metrics_path.write_text("")
        self.trackers = Trackers(cfg, self.run_dir)

    def append_round(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(_finite(record), sort_keys=True) + "\n")
        if self.trackers is not None:
            self.trackers.add_round(record)

    def rewrite_rounds(self, records: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl by ``records`` (a resumed run drops rounds after its checkpoint)."""
        text = "".join(json.dumps(_finite(r), sort_keys=True) + "\n" for r in records)
        _atomic_write(self.metrics_path, lambda h: h.write(text.encode()))

    def read_rounds(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def save_checkpoint(self, name: str, state: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> Path:
        return self.save_payload(name, {"state_dict": state, "meta": _finite(meta)})

    def checkpoint_round(self, name: str) -> int | None:
        """The round saved in ``checkpoints/<name>.pt``, or None if there is none."""
        path = self.paths.checkpoint(name)
        if not path.is_file():
            return None
        meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        return meta.get("round")

    def save_payload(self, name: str, payload: dict[str, Any]) -> Path:
        """Atomically write ``checkpoints/<name>.pt`` with ``torch.save``."""
        path = self.paths.checkpoint(name)
        _atomic_write(path, lambda h: torch.save(payload, h))
        return path

    def write_results(self, results: dict[str, Any]) -> Path:
        path = self.paths.results
        write_json(path, results)
        if self.trackers is not None:
            self.trackers.finish(results)
            self.trackers = None
        return path
