"""The resume checkpoint: everything a killed run needs to continue from its last round.

After every round the server writes ``checkpoints/last.pt`` atomically (temporary
file, fsync, rename), so a crash while writing leaves the previous one intact. It
holds the global model, the strategy's state (server-optimiser moments, the
client-level DP ledger, adaptive clipping norms), the random states of the server
process, the round records written so far, the best model's record, the update
rejection counters, and each client's DP-SGD ledger as last reported.

``python -m fedimg.simulate resume=<run_dir>`` loads it; client training is seeded
by (seed, round, client), so a resumed run replays exactly the rounds that follow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fedimg.config import FedimgConfig, from_dict, to_dict, validate
from fedimg.errors import ConfigError

log = logging.getLogger(__name__)

RESUME_NAME = "last"
LEDGERS_FILE = "checkpoints/ledgers.json"  # clients' DP-SGD ledgers, written as they arrive
FORMAT = 1
# What a resumed run may change: its length, its console, and where it runs.
RESUMABLE_OVERRIDES = ("rounds", "output.progress", "output.plots", "fl.timeout_s",
                       "fl.connect_timeout_s", "sim.")
# A checkpoint holds pickled strategy state: resume only run directories you trust.


@dataclass
class ResumeState:
    """The server's state after a complete round."""

    round: int
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    rng: dict[str, Any]
    rounds: list[dict[str, Any]]
    best: dict[str, Any]
    rejections: dict[int, int] = field(default_factory=dict)
    ledgers: dict[int, str] = field(default_factory=dict)


def config_digest(cfg: FedimgConfig) -> str:
    """Hash of everything that must match for a checkpoint to be resumed.

    Left out: what a resume may change (:data:`RESUMABLE_OVERRIDES`) and where the run
    directory is (it may be given relative, or have moved).
    """
    values = to_dict(cfg)
    for key in RESUMABLE_OVERRIDES:
        *parents, leaf = key.rstrip(".").split(".")
        section = values
        for name in parents:
            section = section[name]
        section.pop(leaf, None)
    values["output"].pop("run_dir", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def resumed_config(run_dir: Path, overrides: list[str]) -> FedimgConfig:
    """The config of the run in ``run_dir`` (its ``config.json``), with allowed overrides."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no config.json (is it a fedimg "
                          "run directory?)")
    try:
        values = json.loads(path.read_text())["config"]
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"cannot resume {run_dir}: {path} is unreadable ({exc})") from exc
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.startswith(RESUMABLE_OVERRIDES):
            raise ConfigError(f"'{override}' cannot change a resumed run; resume continues "
                              f"the saved config and accepts only {', '.join(RESUMABLE_OVERRIDES)}"
                              "<key>=...")
    merged = OmegaConf.merge(OmegaConf.create(values), OmegaConf.from_dotlist(list(overrides)))
    values = OmegaConf.to_container(merged)
    values["output"]["run_dir"] = str(run_dir.resolve())
    return validate(from_dict(values))


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The mutable attributes of a Flower strategy (recursing into wrapped strategies).

    Functions are skipped (they are configuration, rebuilt from the config); values
    such as FedAdam's ``m_t``/``v_t``, FedAvgM's momentum, an adaptive clipping
    norm or a privacy ledger are kept.
    """
    state: dict[str, Any] = {}
    for key, value in vars(strategy).items():
        if isinstance(value, Strategy):
            state[key] = {"__strategy__": strategy_state(value)}
        elif not callable(value):
            state[key] = value
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`strategy_state` on a freshly built strategy of the same config."""
    for key, value in state.items():
        if isinstance(value, dict) and "__strategy__" in value:
            restore_strategy_state(getattr(strategy, key), value["__strategy__"])
        else:
            setattr(strategy, key, value)


def rng_state() -> dict[str, Any]:
    """Random states of this process (Python, NumPy's global generator, torch CPU)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def resume_payload(state: ResumeState, cfg: FedimgConfig,
                   classes: list[str]) -> dict[str, Any]:
    """The dict written to ``last.pt``; ``meta`` identifies the run it belongs to."""
    meta = {"format": FORMAT, "round": state.round, "model": cfg.model,
            "classes": list(classes), "config_digest": config_digest(cfg)}
    # The strategy state is pickled separately, into a byte tensor (stored raw, and
    # readable by torch.load(weights_only=True), which can still load the model).
    blob = pickle.dumps({"strategy": state.strategy, "rng": state.rng,
                         "rounds": state.rounds, "best": state.best,
                         "rejections": state.rejections, "ledgers": state.ledgers},
                        protocol=pickle.HIGHEST_PROTOCOL)
    return {"state_dict": state.arrays, "meta": meta,
            "resume": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}


def load_resume_state(run_dir: Path, cfg: FedimgConfig, classes: list[str]) -> ResumeState:
    """The state saved in ``run_dir``, checked against the run it is meant to continue."""
    path = run_dir / "checkpoints" / f"{RESUME_NAME}.pt"
    if not path.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no {path.name} (the run ended "
                          "before its first round, or ran with output.checkpoints=false)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        meta, extra = payload["meta"], pickle.loads(payload["resume"].numpy().tobytes())
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"cannot resume from {path}: the file is unreadable "
                          f"({type(exc).__name__}: {exc})") from exc
    _check_meta(path, meta, cfg, classes)
    return ResumeState(round=int(meta["round"]), arrays=payload["state_dict"],
                       strategy=extra["strategy"], rng=extra["rng"], rounds=extra["rounds"],
                       best=extra["best"], rejections=extra["rejections"],
                       ledgers=extra["ledgers"])


def _check_meta(path: Path, meta: Mapping[str, Any], cfg: FedimgConfig,
                classes: list[str]) -> None:
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} has checkpoint format {meta.get('format')}; this "
                          f"fedimg writes format {FORMAT}")
    if meta.get("model") != cfg.model:
        raise ConfigError(f"{path} holds a '{meta.get('model')}' model; this run "
                          f"uses '{cfg.model}'")
    if list(meta.get("classes", [])) != list(classes):
        raise ConfigError(f"{path} was trained on {len(meta.get('classes', []))} classes "
                          f"{list(meta.get('classes', []))[:5]}; this run's data has "
                          f"{len(classes)} {list(classes)[:5]}")
    if meta.get("config_digest") != config_digest(cfg):
        raise ConfigError(f"{path} belongs to a different config than {path.parent.parent}"
                          "/config.json; resume takes the saved config (only rounds may "
                          "change)")
    if int(meta["round"]) >= cfg.rounds:
        log.warning("%s is at round %s of %d: nothing left to run; pass rounds=N to "
                    "extend the run", path, meta["round"], cfg.rounds)
