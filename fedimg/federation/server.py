"""Server-side orchestration: prepare a run, drive a Flower strategy, record rounds.

:func:`prepare_run` does everything that can fail on bad input (load the data,
partition it, check partition sizes) and writes the run directory's first files,
all before any worker starts. :func:`run_federation` is what the ServerApp's
``main`` calls: it discovers the clients, builds the initial model and the
strategy from the registry, and hands over to Flower's ``strategy.start``. A
:class:`RoundTracker`, passed as the strategy's ``evaluate_fn``, closes each round:
central evaluation on the held-out test split, one ``metrics.jsonl`` line with
per-client metrics and bytes, checkpoints and the progress bar.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedimg.config import FedimgConfig, to_dict
from fedimg.errors import FedimgError, PrivacyBudgetExhausted
from fedimg.data import (
    ClientPartition,
    Dataset,
    label_distribution,
    load_dataset,
    partition_dataset,
    save_partitions,
)
from fedimg.federation.grid import ClientExchange, InstrumentedGrid, discover_partitions
from fedimg.federation.records import (
    config_record,
    nan_weighted_mean,
    record_to_state_dict,
    state_dict_to_record,
)
from fedimg.federation.strategies import build_strategy
from fedimg.models import build_model
from fedimg.privacy import PRIVACY_MODES
from fedimg.reporting import RoundProgress, RunRecorder, library_versions
from fedimg.reporting.run_dir import write_json
from fedimg.task import PARTITIONS_FILE, CentralEvaluator

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A validated config with its data loaded and partitioned, before round 1."""

    cfg: FedimgConfig
    dataset: Dataset
    partitions: list[ClientPartition]
    recorder: RunRecorder
    initial_state: dict[str, torch.Tensor]
    strategy: Strategy
    started: float = field(default_factory=time.perf_counter)

    @property
    def client_cfg(self) -> FedimgConfig:
        """The config sent to clients: where the server read real data, so must they.

        A worker that cannot find the data then fails loudly instead of silently
        training on the synthetic fallback while results.json says "real".
        """
        if self.dataset.provenance.source != "real":
            return self.cfg
        return dataclasses.replace(self.cfg,
                                   data=dataclasses.replace(self.cfg.data, source="strict"))


def initial_model(cfg: FedimgConfig, num_classes: int) -> tuple[dict[str, torch.Tensor],
                                                                frozenset[str]]:
    """The starting global weights, and the names of the arrays clients do not train.

    Those are the buffers (BatchNorm statistics) and any frozen parameters; server
    optimisers average them instead of stepping them, and client-level DP keeps them.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=num_classes, weights=cfg.weights,
                        transfer=cfg.transfer)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fixed = {name for name, _ in model.named_buffers()}
    fixed |= {name for name, p in model.named_parameters() if not p.requires_grad}
    return state, frozenset(fixed)


def prepare_run(cfg: FedimgConfig) -> PreparedRun:
    """Load and partition the data and start the run directory (fails before round 1)."""
    recorder = RunRecorder(cfg.output.run_dir or "runs/unnamed")
    recorder.write_config(cfg)
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
    state, buffers = initial_model(cfg, dataset.num_classes)
    return PreparedRun(cfg=cfg, dataset=dataset, partitions=partitions, recorder=recorder,
                       initial_state=state,
                       strategy=build_strategy(cfg, buffer_keys=buffers))


def _summarise(exchanges: list[ClientExchange], phase: str) -> dict[str, float]:
    ok = [e for e in exchanges if e.phase == phase and e.status == "ok"]
    keys = sorted({k for e in ok for k in e.metrics})
    weights = [float(e.num_examples) for e in ok]
    return {k: nan_weighted_mean([e.metrics.get(k, float("nan")) for e in ok], weights)
            for k in keys}


def _clients(exchanges: list[ClientExchange]) -> dict[str, dict[str, Any]]:
    clients: dict[str, dict[str, Any]] = {}
    for e in exchanges:
        entry = clients.setdefault(str(e.partition_id), {"bytes_down": 0, "bytes_up": 0})
        entry["bytes_down"] += e.bytes_down
        entry["bytes_up"] += e.bytes_up
        phase = "train" if e.phase == "train" else "val"
        entry[phase] = {**e.metrics, "num_examples": e.num_examples}
        if e.status != "ok":
            entry[f"{phase}_status"] = f"{e.status}: {e.reason}"
    return clients


class RoundTracker:
    """The strategy's ``evaluate_fn``: closes each round and records it."""

    def __init__(self, prepared: PreparedRun, grid: InstrumentedGrid,
                 reference: dict[str, torch.Tensor]) -> None:
        self.prepared, self.cfg, self.grid = prepared, prepared.cfg, grid
        self.reference = reference
        self.evaluator = (CentralEvaluator(self.cfg, prepared.dataset)
                          if self.cfg.fl.central_eval else None)
        self.progress = RoundProgress(self.cfg.rounds, enabled=self.cfg.output.progress)
        self.rounds: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.last_state: dict[str, torch.Tensor] = {}
        self.round_started = time.perf_counter()
        self.stopped: str | None = None
        self.secret_sampling = (PRIVACY_MODES.get(self.cfg.privacy.mode).secret_sampling
                                and not self.cfg.privacy.seeded_noise)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        # Flower samples clients with Python's `random`; seeding per round keeps the
        # sample of round r+1 independent of anything else drawn in between. Under
        # client-level DP the sample is part of the mechanism and must stay secret.
        random.seed(secrets.randbits(64) if self.secret_sampling
                    else f"{self.cfg.seed}-{server_round + 1}")
        state = record_to_state_dict(arrays, self.reference)
        eval_started = time.perf_counter()
        test = self.evaluator(state) if self.evaluator else {}
        exchanges = self.grid.drain()
        record: dict[str, Any] = {
            "round": server_round, **_summarise(exchanges, "train"),
            **_summarise(exchanges, "evaluate"), **test,
            "central_eval_s": time.perf_counter() - eval_started,
            "wall_s": time.perf_counter() - self.round_started,
            "bytes_down": sum(e.bytes_down for e in exchanges),
            "bytes_up": sum(e.bytes_up for e in exchanges),
            "clients_ok": sum(e.phase == "train" and e.status == "ok" for e in exchanges),
            "clients_failed": sum(e.status in ("failed", "timeout") for e in exchanges),
            "clients_rejected": sum(e.status == "rejected" for e in exchanges),
            "clients_declined": sum(e.status == "declined" for e in exchanges),
            **self.strategy_privacy(),
            "clients": _clients(exchanges)}
        self.prepared.recorder.append_round(record)
        self.rounds.append(record)
        if server_round > 0 and record["clients_ok"] == 0:
            self._stop_if_budgets_spent(server_round, exchanges)
            reasons = [e.reason for e in exchanges if e.status != "ok"]
            raise FedimgError(f"round {server_round}: no client returned a usable update "
                              f"({len(reasons)} failed); first reason: "
                              f"{reasons[0].splitlines()[-1] if reasons else 'none'}")
        self.last_state = state
        self._maybe_best(record, state)
        if server_round > 0:
            self.progress.update({k: record.get(k, float("nan")) for k in
                                  ("train/loss", "val/accuracy", "test/accuracy")})
        self.round_started = time.perf_counter()
        return MetricRecord({k: v for k, v in test.items() if v == v}) if test else None

    def strategy_privacy(self) -> dict[str, float]:
        """Server-side privacy metrics (client-level DP), if the strategy keeps any."""
        report = getattr(self.prepared.strategy, "privacy_report", None)
        return report() if callable(report) else {}

    def _stop_if_budgets_spent(self, server_round: int,
                               exchanges: list[ClientExchange]) -> None:
        trained = [e for e in exchanges if e.phase == "train"]
        if trained and all(e.status == "declined" for e in trained):
            raise PrivacyBudgetExhausted(f"round {server_round}: every sampled client "
                                         "declined, its privacy budget spent; stopping")

    def score(self, record: dict[str, Any]) -> float:
        """Model-selection score: ``output.select_metric`` (never a test-split metric).

        The default, federated validation balanced accuracy, does not reward a model
        for predicting the majority class of imbalanced local splits. Without federated
        evaluation it falls back to the train accuracy.
        """
        value = record.get(self.cfg.output.select_metric,
                           record.get("train/accuracy", float("nan")))
        return float("-inf") if value is None or value != value else float(value)

    def _maybe_best(self, record: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        if record["round"] == 0 or self.score(record) <= self.score(self.best or {}):
            return
        self.best = {k: v for k, v in record.items() if k != "clients"}
        if self.cfg.output.checkpoints:
            self.prepared.recorder.save_checkpoint("best", state,
                                                   checkpoint_meta(self.prepared, record))


def checkpoint_meta(prepared: PreparedRun, record: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint needs to be reused: config, classes, seed, round, metrics."""
    return {"round": record.get("round"), "model": prepared.cfg.model,
            "classes": list(prepared.dataset.classes), "seed": prepared.cfg.seed,
            "config": to_dict(prepared.cfg),
            "metrics": {k: v for k, v in record.items() if k != "clients"}}


def _results(prepared: PreparedRun, tracker: RoundTracker, startup_s: float) -> dict[str, Any]:
    cfg, rounds = prepared.cfg, tracker.rounds
    final = {k: v for k, v in rounds[-1].items() if k != "clients"} if rounds else {}
    prov = prepared.dataset.provenance
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "name": cfg.name, "seed": cfg.seed, "rounds": cfg.rounds, "model": cfg.model,
        "strategy": cfg.strategy, "run_dir": str(prepared.recorder.run_dir),
        "select_metric": cfg.output.select_metric,
        "final": final, "best": tracker.best, "initial": rounds[0] if rounds else {},
        "data": {"dataset": prepared.dataset.name, "source": prov.source,
                 "location": prov.location, "fallback_reason": prov.fallback_reason,
                 "warnings": list(prov.warnings)},
        "timing": {"startup_s": startup_s,
                   "rounds_s": sum(r["wall_s"] for r in trained),
                   "mean_round_s": (sum(r["wall_s"] for r in trained) / len(trained))
                   if trained else None,
                   "total_s": time.perf_counter() - prepared.started},
        "bytes": {"down": sum(r["bytes_down"] for r in rounds),
                  "up": sum(r["bytes_up"] for r in rounds)},
        "rejected_updates": dict(tracker.grid.rejections),
        "stopped_early": tracker.stopped,
        "privacy": privacy_summary(cfg, rounds),
        "versions": library_versions()}


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


def run_federation(grid: Grid, prepared: PreparedRun) -> dict[str, Any]:
    """Run all rounds of ``prepared`` on ``grid``; return the results dict."""
    cfg, client_cfg, initial = prepared.cfg, prepared.client_cfg, prepared.initial_state
    igrid = InstrumentedGrid(grid, reference=initial)
    discover_partitions(igrid, content=RecordDict({"config": config_record(client_cfg)}),
                        timeout=cfg.fl.timeout_s, connect_timeout=cfg.fl.connect_timeout_s,
                        expected_sizes=[len(p.train_indices) for p in prepared.partitions])
    igrid.drain()
    startup_s = time.perf_counter() - prepared.started
    tracker = RoundTracker(prepared, igrid, initial)
    try:
        prepared.strategy.start(
            grid=igrid, initial_arrays=state_dict_to_record(initial), num_rounds=cfg.rounds,
            timeout=cfg.fl.timeout_s, train_config=config_record(client_cfg),
            evaluate_config=config_record(client_cfg), evaluate_fn=tracker)
    except PrivacyBudgetExhausted as exc:  # a normal end of a private run, not a failure
        tracker.stopped = str(exc)
        log.warning("run stopped early: %s", exc)
    finally:
        tracker.progress.close()
    if cfg.output.checkpoints and tracker.last_state:
        prepared.recorder.save_checkpoint("final", tracker.last_state,
                                          checkpoint_meta(prepared, tracker.rounds[-1]))
    results = _results(prepared, tracker, startup_s)
    prepared.recorder.write_results(results)
    return results
