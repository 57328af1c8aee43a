"""Server-side orchestration: prepare a run, drive a Flower strategy, record rounds.

:func:`prepare_run` does everything that can fail on bad input (load the data,
partition it, check partition sizes, build the model and the strategy, read a
resume checkpoint) and writes the run directory's first files, all before any
worker starts. :func:`run_federation` is what the ServerApp's ``main`` calls: it
discovers the clients, then runs the rounds with :class:`~fedimg.serverapp.loop.RoundLoop`
and closes each one with a :class:`~fedimg.serverapp.callbacks.RoundTracker`
(central evaluation, ``metrics.jsonl``, checkpoints, progress bar).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedimg.config import FedimgConfig
from fedimg.errors import DataError, PrivacyBudgetExhausted
from fedimg.data import (
    DATASETS,
    ClientPartition,
    Dataset,
    label_distribution,
    load_dataset,
    partition_dataset,
    save_partitions,
)
from fedimg.serverapp.checkpoint import (
    LEDGERS_FILE,
    ResumeState,
    load_resume_state,
    restore_rng,
    restore_strategy_state,
)
from fedimg.serverapp.discovery import discover_partitions, discover_sites
from fedimg.transport.grid import InstrumentedGrid
from fedimg.transport.records import config_record, state_dict_to_record
from fedimg.serverapp.loop import RoundLoop
from fedimg.serverapp.strategies import build_strategy
from fedimg.serverapp.callbacks import RoundTracker, checkpoint_meta
from fedimg.serverapp.validation import UpdateChecks
from fedimg.models import build_model, frozen_state_keys
from fedimg.privacy import PRIVACY_MODES
from fedimg.reporting import RunRecorder, library_versions
from fedimg.reporting.run_dir import write_json
from fedimg.clientapp.environment import PARTITIONS_FILE

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A validated config with its data loaded and partitioned, before round 1.

    In a deployment (``deploy.enabled``) the server holds no training data:
    ``partitions`` is empty, ``dataset`` is the held-out test set's dataset for
    central evaluation (None without it), and the sites report their own sizes.
    """

    cfg: FedimgConfig
    dataset: Dataset | None
    partitions: list[ClientPartition]
    recorder: RunRecorder
    classes: tuple[str, ...]
    initial_state: dict[str, torch.Tensor]
    strategy: Strategy
    fixed_keys: frozenset[str] = frozenset()  # buffers and frozen parameters
    frozen_keys: frozenset[str] = frozenset()  # frozen parameters and frozen-BN statistics
    resume: ResumeState | None = None
    started: float = field(default_factory=time.perf_counter)
    sites: dict[int, dict[str, Any]] = field(default_factory=dict)  # deployment: id -> report

    @property
    def client_cfg(self) -> FedimgConfig:
        """The config sent to clients: where the server read real data, so must they.

        A worker that cannot find the data then fails loudly instead of silently
        training on the synthetic fallback while results.json says "real".
        """
        if self.dataset is None or self.dataset.provenance.source != "real":
            return self.cfg
        return dataclasses.replace(self.cfg,
                                   data=dataclasses.replace(self.cfg.data, source="strict"))


def initial_model(cfg: FedimgConfig, num_classes: int) -> tuple[dict[str, torch.Tensor],
                                                                frozenset[str], frozenset[str]]:
    """The starting global weights; the arrays clients do not train; those they never change.

    The first set is the buffers (BatchNorm statistics) and any frozen parameters:
    server optimisers average them instead of stepping them, and client-level DP
    keeps them. The second is the frozen parameters and the statistics of frozen
    BatchNorm layers, which an honest client sends back exactly as it got them.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=num_classes, weights=cfg.weights,
                        transfer=cfg.transfer)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    frozen = frozen_state_keys(model)
    fixed = {name for name, _ in model.named_buffers()} | frozen
    return state, frozenset(fixed), frozen


def prepare_run(cfg: FedimgConfig, *, resume: bool = False) -> PreparedRun:
    """Load and partition the data and start the run directory (fails before round 1).

    With ``resume``, ``cfg.output.run_dir`` is an existing run: its checkpoint is
    read and checked against ``cfg`` here, before anything but the (identical)
    partition files is rewritten.
    """
    recorder = RunRecorder(cfg.output.run_dir or "runs/unnamed")
    if not resume:
        recorder.write_config(cfg)
    if cfg.deploy.enabled:
        return _prepare_deployment(cfg, recorder, resume=resume)
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    partitions = partition_dataset(dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                                   seed=cfg.seed)
    save_partitions(recorder.run_dir / PARTITIONS_FILE, partitions)
    counts = label_distribution(dataset.train.labels.numpy(), partitions, dataset.num_classes)
    write_json(recorder.run_dir / "partitions.json", {
        "classes": list(dataset.classes), "partitioner": cfg.data.partitioner,
        "label_counts": counts.tolist(),
        "train_sizes": [len(p.train_indices) for p in partitions],
        "val_sizes": [len(p.val_indices) for p in partitions]})
    log.info("%s: %d train / %d test images, %d classes, %d clients with %s train samples",
             dataset.name, len(dataset.train.labels), len(dataset.test.labels),
             dataset.num_classes, len(partitions),
             [len(p.train_indices) for p in partitions])
    # Model and strategy errors (bad weights file, krum too few clients) surface here,
    # before any worker starts.
    state, fixed, frozen = initial_model(cfg, dataset.num_classes)
    saved = load_resume_state(recorder.run_dir, cfg, list(dataset.classes)) if resume else None
    if resume:
        recorder.write_config(cfg, keep_metrics=True)  # it may have extended rounds
    return PreparedRun(cfg=cfg, dataset=dataset, partitions=partitions, recorder=recorder,
                       classes=dataset.classes, initial_state=state, fixed_keys=fixed,
                       frozen_keys=frozen, resume=saved,
                       strategy=build_strategy(cfg, buffer_keys=fixed))


def _prepare_deployment(cfg: FedimgConfig, recorder: RunRecorder, *,
                        resume: bool) -> PreparedRun:
    """:func:`prepare_run` for a real federation: no training data on the server.

    The class list is the dataset's (every site's folders are checked against it);
    central evaluation reads the test split from the server's own ``data.root``,
    strictly: a missing test set is an error here, never a synthetic stand-in.
    """
    classes = DATASETS.get(cfg.data.dataset).classes
    dataset = None
    if cfg.fl.central_eval:
        strict = dataclasses.replace(cfg.data, source="strict")
        try:
            dataset = load_dataset(strict, seed=cfg.seed)
        except DataError as exc:
            raise DataError(f"{exc}. In a deployment the server only needs the test split "
                            "for central evaluation; or set fl.central_eval=false") from exc
    state, fixed, frozen = initial_model(cfg, len(classes))
    saved = load_resume_state(recorder.run_dir, cfg, list(classes)) if resume else None
    if resume:
        recorder.write_config(cfg, keep_metrics=True)
    log.info("deployment: %d sites expected; classes %s; central evaluation %s",
             cfg.clients, list(classes), "on" if dataset is not None else "off")
    return PreparedRun(cfg=cfg, dataset=dataset, partitions=[], recorder=recorder,
                       classes=classes, initial_state=state, fixed_keys=fixed,
                       frozen_keys=frozen, resume=saved,
                       strategy=build_strategy(cfg, buffer_keys=fixed))


def _results(prepared: PreparedRun, tracker: RoundTracker, startup_s: float) -> dict[str, Any]:
    cfg, rounds = prepared.cfg, tracker.rounds
    final = {k: v for k, v in rounds[-1].items() if k != "clients"} if rounds else {}
    data = _data_summary(prepared)
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "name": cfg.name, "seed": cfg.seed, "rounds": cfg.rounds, "model": cfg.model,
        "strategy": cfg.strategy, "run_dir": str(prepared.recorder.run_dir),
        "select_metric": cfg.output.select_metric,
        "personalize_steps": cfg.fl.personalize_steps,
        "final": final, "best": tracker.best, "initial": rounds[0] if rounds else {},
        "data": data,
        "timing": {"startup_s": startup_s,
                   "rounds_s": sum(r["wall_s"] for r in trained),
                   "mean_round_s": (sum(r["wall_s"] for r in trained) / len(trained))
                   if trained else None,
                   "total_s": time.perf_counter() - prepared.started},
        "bytes": {"down": sum(r["bytes_down"] for r in rounds),
                  "up": sum(r["bytes_up"] for r in rounds)},
        "participation": {k: sum(r.get(k, 0) for r in trained) for k in (
            "clients_sampled", "clients_ok", "clients_offline", "clients_dropped",
            "clients_straggler", "clients_failed", "clients_rejected")},
        "rejected_updates": {str(k): v for k, v in sorted(tracker.grid.rejections.items())},
        "skipped_rounds": [r["round"] for r in rounds if r.get("skipped")],
        "stopped_early": tracker.stopped,
        "privacy": privacy_summary(cfg, rounds),
        "versions": library_versions()}


def _data_summary(prepared: PreparedRun) -> dict[str, Any]:
    """Where the data came from: the server's dataset, or the sites of a deployment."""
    prov = prepared.dataset.provenance if prepared.dataset is not None else None
    where = ({"source": prov.source, "location": prov.location,
              "fallback_reason": prov.fallback_reason, "warnings": list(prov.warnings)}
             if prov is not None else None)
    if not prepared.cfg.deploy.enabled:
        return {"dataset": prepared.cfg.data.dataset, **(where or {})}
    return {"dataset": prepared.cfg.data.dataset, "source": "sites",
            "sites": dict(prepared.sites), "test_set": where}


def privacy_summary(cfg: FedimgConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Final epsilon of each client (DP-SGD) or of the server (client-level DP), and stops."""
    clients: dict[str, dict[str, Any]] = {}
    for record in rounds:
        for pid, entry in record.get("clients", {}).items():
            dp = {k: v for k, v in entry.get("train", {}).items() if k.startswith("dp/")}
            if not dp:
                continue
            info = clients.setdefault(pid, {"stopped_round": None})
            info.update(dp)
            if entry.get("train_status", "").startswith("declined") and \
                    info["stopped_round"] is None:
                info["stopped_round"] = record["round"]
    server = {k: v for k, v in (rounds[-1] if rounds else {}).items()
              if k.startswith("privacy/")}
    return {"mode": cfg.privacy.mode, "clients": clients, "server": server}


def _start(prepared: PreparedRun, igrid: InstrumentedGrid, tracker: RoundTracker,
           loop: RoundLoop) -> tuple[dict[str, torch.Tensor], int]:
    """The global model and the first round to run: the initial ones, or the checkpoint's."""
    saved = prepared.resume
    if saved is None:
        return prepared.initial_state, 1
    for stale in prepared.recorder.run_dir.glob("checkpoints/.*.pt.*"):
        stale.unlink()  # a temporary file the killed run was writing
    restore_strategy_state(prepared.strategy, saved.strategy)
    if saved.rng:
        restore_rng(saved.rng)
    else:  # client-level DP: its noise RNG was never saved; draw fresh secret state
        np.random.seed(secrets.randbits(32))
    tracker.restore(saved)
    igrid.rejections.update(saved.rejections)
    ledgers = _ledgers_to_return(prepared, saved)
    igrid.ledgers.update(ledgers)
    igrid.pending_ledgers.update(ledgers)
    loop.consecutive_skips = _trailing_skips(saved.rounds)
    log.info("resuming %s after round %d of %d", prepared.recorder.run_dir, saved.round,
             prepared.cfg.rounds)
    return saved.arrays, saved.round + 1


def _ledgers_to_return(prepared: PreparedRun, saved: ResumeState) -> dict[int, str]:
    """The DP-SGD ledgers to hand back to the clients of a resumed run.

    With secret noise the rerun of the interrupted round is a new release, so the
    ledgers as last reported (``ledgers.json``, written as replies arrived, which
    may include that round) are used: epsilon may be over-counted by one round,
    never under-counted. With seeded noise (tests) the rerun repeats the same
    release, and the checkpoint's ledgers make the run identical to one never
    interrupted.
    """
    ledgers = dict(saved.ledgers)
    path = prepared.recorder.run_dir / LEDGERS_FILE
    if not prepared.cfg.privacy.seeded_noise and path.is_file():
        ledgers.update({int(k): v for k, v in json.loads(path.read_text()).items()})
    return ledgers


def _trailing_skips(rounds: list[dict[str, Any]]) -> int:
    count = 0
    for record in reversed(rounds):
        if not record.get("skipped"):
            break
        count += 1
    return count


def _discover(prepared: PreparedRun, igrid: InstrumentedGrid) -> None:
    """Find every client before round 1 (the sites of a deployment, or the partitions)."""
    cfg = prepared.cfg
    content = RecordDict({"config": config_record(prepared.client_cfg)})
    if cfg.deploy.enabled:
        prepared.sites = discover_sites(
            igrid, content=content, timeout=cfg.fl.timeout_s,
            connect_timeout=cfg.fl.connect_timeout_s, num_sites=cfg.clients,
            num_classes=len(prepared.classes))
        write_json(prepared.recorder.run_dir / "sites.json",
                   {str(k): v for k, v in prepared.sites.items()})
    else:
        discover_partitions(igrid, content=content, timeout=cfg.fl.timeout_s,
                            connect_timeout=cfg.fl.connect_timeout_s,
                            expected_sizes=[len(p.train_indices) for p in prepared.partitions])


def run_federation(grid: Grid, prepared: PreparedRun) -> dict[str, Any]:
    """Run all rounds of ``prepared`` on ``grid`` (from its checkpoint if resuming).

    Returns the results dict, also written to ``results.json``. A run that stops
    early still writes its results (``stopped_early`` says why) and final checkpoint:
    spent privacy budgets are a normal end; any other error (too many skipped rounds,
    a bug) is re-raised after that.
    """
    cfg, client_cfg, initial = prepared.cfg, prepared.client_cfg, prepared.initial_state
    igrid = InstrumentedGrid(grid, reference=initial, checks=UpdateChecks(
        initial, fl=cfg.fl, fixed_keys=prepared.fixed_keys, immutable_keys=prepared.frozen_keys,
        screen_norms=not PRIVACY_MODES.get(cfg.privacy.mode).clips_updates),
        ledger_path=prepared.recorder.run_dir / LEDGERS_FILE, pack=cfg.fl.pack_arrays,
        hetero=cfg.hetero)
    _discover(prepared, igrid)
    igrid.drain()
    startup_s = time.perf_counter() - prepared.started
    start_round = prepared.resume.round + 1 if prepared.resume else 1
    tracker = RoundTracker(prepared, igrid, initial, start_round=start_round)
    loop = RoundLoop(cfg, prepared.strategy, igrid, train_config=config_record(client_cfg),
                     evaluate_config=config_record(client_cfg))
    state, start_round = _start(prepared, igrid, tracker, loop)
    stop: Exception | None = None
    try:
        loop.run(state_dict_to_record(state), start=start_round, on_round_end=tracker)
    except PrivacyBudgetExhausted as exc:  # a normal end of a private run
        tracker.stopped = str(exc)
        log.warning("run stopped early: %s", exc)
    except Exception as exc:  # noqa: BLE001 - results are written, then it propagates
        tracker.stopped, stop = f"{type(exc).__name__}: {exc}", exc
        log.error("run stopped: %s", tracker.stopped)
    finally:
        tracker.progress.close()
    if cfg.output.checkpoints and tracker.last_state:
        last = next(r for r in reversed(tracker.rounds) if not r.get("stopped"))
        prepared.recorder.save_checkpoint("final", tracker.last_state,
                                          checkpoint_meta(prepared, last))
    results = _results(prepared, tracker, startup_s)
    prepared.recorder.write_results(results)
    if stop is not None:
        raise stop
    return results
