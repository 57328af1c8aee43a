"""What an export starts from: a run's checkpoint rebuilt as a model, and its images.

The contract is the checkpoint file, ``<run_dir>/checkpoints/{final,best}.pt``: a
``torch.save`` of ``{"state_dict": ..., "meta": {"config": <resolved config>,
"classes": [...], "round": ...}}`` as :class:`~fedimg.reporting.RunRecorder` writes
it. When ``meta`` has no config, ``<run_dir>/config.json`` is read instead. The
network is rebuilt with the run's own builder and transfer settings (so frozen
BatchNorm layers have the same names) and loaded strictly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedimg.config import FedimgConfig, from_dict
from fedimg.data import InMemoryLoader, build_transform, load_dataset
from fedimg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fedimg.errors import ConfigError, ModelError
from fedimg.models import MODELS, build_model
from fedimg.reporting.paths import RunPaths

log = logging.getLogger(__name__)

CHECKPOINTS = ("final", "best")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class RunModel:
    """A run's model rebuilt from one checkpoint, in eval mode on the CPU."""

    model: nn.Module
    cfg: FedimgConfig
    classes: tuple[str, ...]
    checkpoint: Path
    round: int | None


@dataclass(frozen=True)
class EvalData:
    """Model-ready images: float32 (N, 3, S, S) after fedimg's eval transform."""

    test_x: torch.Tensor  # (N, 3, S, S) test images (a seeded subset with max_test)
    test_y: torch.Tensor  # (N,) int64 labels
    calib_x: torch.Tensor  # (M, 3, S, S) train images for int8 calibration
    provenance: dict[str, Any]


def checkpoint_path(run_dir: str | Path, checkpoint: str = "final") -> Path:
    """``<run_dir>/checkpoints/<checkpoint>.pt``, or ``checkpoint`` itself if it is a file."""
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        if Path(checkpoint).suffix == ".pt":
            return Path(checkpoint)
        raise ModelError(f"checkpoint='{checkpoint}' is unknown; valid: "
                         f"{', '.join(CHECKPOINTS)} or a path to a .pt file")
    if not run_dir.is_dir():
        raise ModelError(f"run directory {run_dir} does not exist; fix: pass the folder a "
                         f"run wrote (it holds config.yaml and checkpoints/)")
    return RunPaths(run_dir).checkpoint(checkpoint)


def load_run_model(run_dir: str | Path, *, checkpoint: str = "final") -> RunModel:
    """The model saved in ``run_dir``'s ``checkpoint`` (final, best or a .pt path)."""
    path = checkpoint_path(run_dir, checkpoint)
    payload = _read_payload(path)
    meta = payload.get("meta") or {}
    cfg = _config_of(meta, Path(run_dir), path)
    state = payload["state_dict"]
    classes = tuple(str(c) for c in meta.get("classes") or ())
    num_classes = len(classes) or _head_rows(cfg.model, state, path)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=num_classes, weights="none",
                        transfer=cfg.transfer)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"checkpoint {path} does not fit model={cfg.model} with "
                         f"{num_classes} classes and transfer={cfg.transfer}: "
                         f"{str(exc).splitlines()[0]} {_key_diff(model, state)}; fix: export "
                         f"with the fedimg version that wrote the run") from exc
    classes = classes or tuple(str(i) for i in range(num_classes))
    return RunModel(model=model.eval(), cfg=cfg, classes=classes, checkpoint=path,
                    round=meta.get("round"))


def _read_payload(path: Path) -> dict[str, Any]:
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.pt")) if path.parent.is_dir() else []
        raise ModelError(f"checkpoint {path} does not exist (found: {found or 'none'}); "
                         f"fix: choose --checkpoint {' or '.join(CHECKPOINTS)}, or finish "
                         f"the run with output.checkpoints=true")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle and EOF errors all mean corrupt
        raise ModelError(f"checkpoint {path} is corrupt or not a torch.save file "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); fix: "
                         f"export another checkpoint (--checkpoint best) or re-run") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
        raise ModelError(f"checkpoint {path} holds no 'state_dict' mapping; expected "
                         f"{{'state_dict': ..., 'meta': ...}} as fedimg runs save it")
    return payload


def _config_of(meta: dict[str, Any], run_dir: Path, path: Path) -> FedimgConfig:
    values = meta.get("config")
    source = f"the meta of {path}"
    if not isinstance(values, dict):
        config_json = RunPaths(run_dir).config_json
        if not config_json.is_file():
            raise ModelError(f"checkpoint {path} has no meta.config and {config_json} is "
                             f"missing, so the model cannot be rebuilt; fix: export from "
                             f"the run directory that wrote the checkpoint")
        values, source = json.loads(config_json.read_text()).get("config"), str(config_json)
    try:
        return from_dict(values)  # validated; the model name resolves when it is built
    except (ConfigError, TypeError) as exc:
        raise ModelError(f"the config in {source} does not match this fedimg version: "
                         f"{exc}") from exc


def _head_rows(model_name: str, state: dict[str, torch.Tensor], path: Path) -> int:
    key = f"{MODELS.get(model_name).head}.weight"
    if key not in state:
        raise ModelError(f"checkpoint {path} has neither meta.classes nor '{key}'")
    return int(state[key].shape[0])


def _key_diff(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    expected, given = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - given)[:3], sorted(given - expected)[:3]
    return f"(missing {missing}, unexpected {unexpected})" if missing or unexpected else ""


def input_spec(cfg: FedimgConfig) -> dict[str, Any]:
    """What the exported model takes: fedimg's eval transform is *not* inside it."""
    size = cfg.data.image_size
    return {
        "name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32",
        "layout": "NCHW", "channels": "RGB (greyscale repeated to 3 channels)",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "preprocess": f"resize to {size}x{size} (bilinear, antialiased), "
                      f"x = (uint8 / 255 - mean) / std per channel",
    }


def output_spec(num_classes: int) -> dict[str, Any]:
    """What the exported model returns."""
    return {"name": OUTPUT_NAME, "shape": ["batch", num_classes], "dtype": "float32",
            "meaning": "unnormalised class scores (softmax for probabilities); "
                       "index i is classes[i]"}


def _subset(n: int, k: int | None, *, seed: int, stream: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, stream]).choice(n, size=k, replace=False))


def _transformed(images: torch.Tensor, labels: torch.Tensor, indices: np.ndarray,
                 cfg: FedimgConfig) -> tuple[torch.Tensor, torch.Tensor]:
    tf = build_transform("none", image_size=cfg.data.image_size, train=False)
    loader = InMemoryLoader(images, labels, indices=indices, batch_size=256, transform=tf,
                            shuffle=False, seed=cfg.seed)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def load_eval_data(cfg: FedimgConfig, *, max_test: int | None = None, calib: int = 128,
                   data_root: str | None = None) -> EvalData:
    """Test images (all, or a seeded subset of ``max_test``) and ``calib`` train images."""
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_root))
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    test, train = dataset.test, dataset.train
    if len(test) == 0 or len(train) == 0:
        raise ModelError(f"dataset '{cfg.data.dataset}' has {len(train)} train and "
                         f"{len(test)} test images; an export needs both")
    test_x, test_y = _transformed(test.images, test.labels,
                                  _subset(len(test), max_test, seed=cfg.seed, stream=1), cfg)
    calib_x, _ = _transformed(train.images, train.labels,
                              _subset(len(train), calib, seed=cfg.seed, stream=2), cfg)
    prov = dataset.provenance
    if prov.source == "synthetic-fallback":
        log.warning("the run's data was not found, so the test images are synthetic (%s): "
                    "the accuracies in the report are meaningless; fix: set FEDIMG_DATA or "
                    "--data-root", prov.fallback_reason)
    provenance = {"dataset": cfg.data.dataset, "source": prov.source,
                  "location": prov.location, "test_examples": len(test_y),
                  "test_split_size": len(test), "calibration_examples": len(calib_x)}
    return EvalData(test_x=test_x, test_y=test_y, calib_x=calib_x, provenance=provenance)
