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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
from omegaconf import OmegaConf

from fedimg.config import FedimgConfig, from_dict, to_dict
from fedimg.errors import ConfigError
from fedimg.reporting import RunRecorder
from fedimg.resolve import check_registries
from fedimg.serverapp.state import RunState, global_rng_state, restore_global_rng
from fedimg.serverapp.state_codec import decode, encode
from fedimg.transport.records import state_dict_to_record
from fedimg.reporting.paths import RunPaths

log = logging.getLogger(__name__)

RESUME_NAME = "last"
LEDGERS_FILE = "checkpoints/ledgers.json"  # clients' DP-SGD ledgers, written as they arrive
FORMAT = 2  # 2: JSON and tensors, loaded with weights_only=True (1 pickled its state)
# What a resumed run may change: its length, its console, and where it runs.
RESUMABLE_OVERRIDES = ("rounds", "output.progress", "output.plots", "output.tensorboard",
                       "output.mlflow", "output.mlflow_uri", "fl.timeout_s",
                       "fl.connect_timeout_s", "sim.")
# Strategy attributes that are sampling configuration, rebuilt from the config (the round
# loop samples): never saved, never restored.
_SAMPLING_ATTRS = frozenset({"fraction_train", "fraction_evaluate", "min_train_nodes",
                             "min_evaluate_nodes", "min_available_nodes"})


@dataclass
class SavedRun:
    """What ``last.pt`` holds, checked against the run it is meant to continue."""

    round: int
    arrays: dict[str, torch.Tensor]  # exactly as the strategy produced them
    extra: dict[str, Any]  # strategy state, RNG states, records, best, rejections, ledgers


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
    path = RunPaths(run_dir).config_json
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
    return check_registries(from_dict(values))


def config_from_argv(argv: Sequence[str]) -> tuple[FedimgConfig, bool]:
    """The run config of ``scenario=... key=value ...`` or ``resume=<run_dir> [key=value]``.

    Returns the config and whether it resumes a run (its checkpoint is then read by
    :func:`fedimg.build.prepare_run`). Used by simulation and the deployed ServerApp.
    """
    from fedimg.config.compose import split_argv
    from fedimg.resolve import compose_and_check

    resume = next((a.partition("=")[2] for a in argv if a.startswith("resume=")), None)
    if resume is not None:
        rest = [a for a in argv if not a.startswith("resume=")]
        return resumed_config(Path(resume).expanduser(), rest), True
    scenario, overrides = split_argv(list(argv))
    return compose_and_check(scenario, overrides), False


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The mutable attributes of a Flower strategy (recursing into wrapped strategies).

    Functions and sampling settings are skipped (configuration, rebuilt from the
    config); values such as FedAdam's ``m_t``/``v_t``, FedAvgM's momentum, an adaptive
    clipping norm or a privacy ledger are kept.
    """
    state: dict[str, Any] = {}
    for key, value in vars(strategy).items():
        if key in _SAMPLING_ATTRS:
            continue
        if isinstance(value, Strategy):
            state[key] = {"__strategy__": strategy_state(value)}
        elif not callable(value):
            state[key] = value
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`strategy_state` on a freshly built strategy of the same config."""
    for key, value in state.items():
        if key in _SAMPLING_ATTRS:  # a format-1 state saved them; the loop samples now
            continue
        if isinstance(value, dict) and "__strategy__" in value:
            restore_strategy_state(getattr(strategy, key), value["__strategy__"])
        else:
            setattr(strategy, key, value)


def save_resume_state(recorder: RunRecorder, state: RunState, cfg: FedimgConfig,
                      classes: list[str]) -> None:
    """Write ``checkpoints/last.pt``: the run state after ``state.round``.

    The global arrays are kept exactly as the strategy produced them (FedAdam's are
    float64), not cast to the model's dtypes, so the resumed rounds are bit-identical.
    Under client-level DP the server's RNGs draw the noise and the client sample:
    they are never written to disk.
    """
    exact = {k: torch.from_numpy(np.array(v.numpy())) for k, v in state.arrays.items()}
    meta = {"format": FORMAT, "round": state.round, "model": cfg.model,
            "classes": list(classes), "config_digest": config_digest(cfg)}
    # The rest as JSON plus named tensors: torch.load(weights_only=True) reads it back
    # without unpickling anything (fedimg.serverapp.state_codec).
    tensors: dict[str, torch.Tensor] = {}
    extra = encode({"strategy": strategy_state(state.strategy),
                    "rng": {} if state.sampler.secret else global_rng_state(),
                    "rounds": state.rounds, "best": state.best,
                    "rejections": dict(state.rejections), "ledgers": dict(state.ledgers)},
                   tensors)
    recorder.save_payload(RESUME_NAME, {
        "state_dict": exact, "meta": meta, "state_json": json.dumps(extra),
        "state_tensors": tensors})


def restore_run_state(state: RunState, saved: SavedRun, *, recorder: RunRecorder,
                      reported_ledgers: dict[int, str]) -> None:
    """Continue ``state`` (freshly built from the same config) after ``saved``.

    Its rounds become the run's history (metrics.jsonl is rewritten to them). The
    DP-SGD ledgers are handed back to their clients until each has replied;
    ``reported_ledgers`` (``ledgers.json``, written as replies arrived) override the
    checkpoint's, so a round interrupted after the clients spent budget is counted.
    """
    extra = saved.extra
    state.round, state.arrays = saved.round, state_dict_to_record(saved.arrays)
    restore_strategy_state(state.strategy, extra["strategy"])
    restore_global_rng(extra["rng"])
    state.rounds, state.best = list(extra["rounds"]), dict(extra["best"])
    state.rejections = Counter({int(k): int(v) for k, v in extra["rejections"].items()})
    state.ledgers = {**{int(k): v for k, v in extra["ledgers"].items()}, **reported_ledgers}
    state.ledgers_to_return = set(state.ledgers)
    state.skips = _trailing_skips(state.rounds)
    recorder.rewrite_rounds(state.rounds)
    for stale in recorder.run_dir.glob("checkpoints/.*.pt.*"):
        stale.unlink()  # a temporary file the killed run was writing


def repair_best(state: RunState, saved: SavedRun, *, recorder: RunRecorder,
                reference: Mapping[str, torch.Tensor], meta: Callable[[dict[str, Any]],
                                                                      dict[str, Any]]) -> None:
    """If the run died between writing last.pt and best.pt, write best.pt now.

    The checkpoint's round is then the best one and its weights are the checkpoint's.
    """
    if state.best.get("round") == saved.round and \
            recorder.checkpoint_round("best") != saved.round and state.rounds:
        weights = {k: v.to(reference[k].dtype) for k, v in saved.arrays.items()}
        recorder.save_checkpoint("best", weights, meta(state.rounds[-1]))


def _trailing_skips(rounds: list[dict[str, Any]]) -> int:
    count = 0
    for record in reversed(rounds):
        if not record.get("skipped"):
            break
        count += 1
    return count


def load_resume_state(run_dir: Path, cfg: FedimgConfig, classes: list[str]) -> SavedRun:
    """The state saved in ``run_dir``, checked against the run it is meant to continue."""
    path = RunPaths(run_dir).checkpoint(RESUME_NAME)
    if not path.is_file():
        raise ConfigError(f"cannot resume {run_dir}: it has no {path.name} (the run ended "
                          "before its first round, or ran with output.checkpoints=false)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = payload["meta"]
        if "state_json" not in payload:
            raise ConfigError(f"cannot resume from {path}: it was written by an older fedimg "
                              f"(checkpoint format {meta.get('format')}) that pickled its "
                              "state, and unpickling can run code, so it is not loaded. Fix: "
                              "start the run again, or resume it with the fedimg that wrote it")
        extra = decode(json.loads(payload["state_json"]), payload["state_tensors"])
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"cannot resume from {path}: the file is unreadable "
                          f"({type(exc).__name__}: {exc})") from exc
    _check_meta(path, meta, cfg, classes)
    return SavedRun(round=int(meta["round"]), arrays=payload["state_dict"], extra=extra)


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
