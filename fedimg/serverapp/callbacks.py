"""Closing each round: central evaluation, one ``metrics.jsonl`` line, checkpoints.

A :class:`RoundTracker` is called by the round loop after every round (and for
round 0, the initial model). It evaluates the global model on the held-out test
split, writes the round's record (aggregated and per-client metrics, bytes, client
statuses, attempts), keeps the best model by ``output.select_metric``, advances
the progress bar and writes the resume checkpoint (``checkpoints/last.pt``).
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedimg.simulation import fleet
from fedimg.config import to_dict
from fedimg.serverapp.checkpoint import (
    RESUME_NAME,
    ResumeState,
    resume_payload,
    rng_state,
    strategy_state,
)
from fedimg.transport.grid import ClientExchange, InstrumentedGrid
from fedimg.transport.records import nan_weighted_mean, record_to_state_dict
from fedimg.serverapp.loop import RoundOutcome
from fedimg.privacy import PRIVACY_MODES
from fedimg.reporting import RoundProgress
from fedimg.serverapp.evaluation import CentralEvaluator

if TYPE_CHECKING:
    from fedimg.serverapp.run import PreparedRun

log = logging.getLogger(__name__)


def _summarise(exchanges: list[ClientExchange], phase: str) -> dict[str, float]:
    # In partition order, not arrival order: the float sums, and so the records, are
    # then the same in every run with the same seed (a resumed one included).
    ok = sorted((e for e in exchanges if e.phase == phase and e.status == "ok"),
                key=lambda e: e.partition_id)
    keys = sorted({k for e in ok for k in e.metrics})
    weights = [float(e.num_examples) for e in ok]
    return {k: nan_weighted_mean([e.metrics.get(k, float("nan")) for e in ok], weights)
            for k in keys}


def fairness(exchanges: list[ClientExchange], metric: str = "val/accuracy"
             ) -> dict[str, float]:
    """How evenly the global model serves the clients that evaluated it this round.

    Worst client, 10th percentile (linear interpolation), spread (best - worst) and
    standard deviation of ``metric`` over the clients' own validation splits, the
    client-level view of fairness in federated learning (Li et al. 2020, "Fair
    Resource Allocation in Federated Learning"). Empty if no client evaluated.
    """
    # In partition order, not arrival order: the float sums are then the same in every
    # run with the same seed (a resumed one included).
    ordered = sorted(exchanges, key=lambda e: e.partition_id)
    values = np.array([e.metrics[metric] for e in ordered
                       if e.phase == "evaluate" and e.status == "ok" and metric in e.metrics],
                      dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    name = metric.split("/", 1)[-1] if metric.startswith("val/") else metric.replace("/", "_")
    return {f"fair/worst_{name}": float(values.min()),
            f"fair/p10_{name}": float(np.percentile(values, 10)),
            f"fair/spread_{name}": float(values.max() - values.min()),
            f"fair/std_{name}": float(values.std())}


def _clients(exchanges: list[ClientExchange]) -> dict[str, dict[str, Any]]:
    clients: dict[str, dict[str, Any]] = {}
    for e in exchanges:
        entry = clients.setdefault(str(e.partition_id), {"bytes_down": 0, "bytes_up": 0})
        entry["bytes_down"] += e.bytes_down
        entry["bytes_up"] += e.bytes_up
        phase = "train" if e.phase == "train" else "val"
        entry[phase] = {**e.metrics, "num_examples": e.num_examples}
        if e.update_norm == e.update_norm:
            entry["update_norm"] = e.update_norm
        if e.status != "ok":
            entry[f"{phase}_status"] = f"{e.status}: {e.reason}"
        else:  # a retried round: the attempt that counted
            entry.pop(f"{phase}_status", None)
    return clients


def _counts(exchanges: list[ClientExchange]) -> dict[str, int]:
    trained = [e for e in exchanges if e.phase == "train"]
    return {"clients_sampled": len(trained),
            "clients_ok": sum(e.status == "ok" for e in trained),
            "clients_failed": sum(e.status in ("failed", "timeout") for e in exchanges),
            "clients_rejected": sum(e.status == "rejected" for e in exchanges),
            "clients_declined": sum(e.status == "declined" for e in exchanges),
            **{f"clients_{s}": sum(e.status == s for e in trained)
               for s in ("offline", "dropped", "straggler")}}


def device_time(exchanges: list[ClientExchange], deadline_s: float | None) -> dict[str, float]:
    """The round's length on the simulated devices (``hetero.*``): its slowest used reply.

    A round that lost a straggler lasted until the deadline. Empty when no client
    reported device time (heterogeneity off).
    """
    trained = [e for e in exchanges if e.phase == "train"]
    times = [e.metrics["hetero/device_s"] for e in trained
             if e.status == "ok" and "hetero/device_s" in e.metrics]
    if not times and not any(e.status == "straggler" for e in trained):
        return {}
    cut = deadline_s is not None and any(e.status == "straggler" for e in trained)
    return {"device/round_s": float(deadline_s) if cut else max(times)}


def checkpoint_meta(prepared: PreparedRun, record: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint needs to be reused: config, classes, seed, round, metrics."""
    return {"round": record.get("round"), "model": prepared.cfg.model,
            "classes": list(prepared.classes), "seed": prepared.cfg.seed,
            "config": to_dict(prepared.cfg),
            "metrics": {k: v for k, v in record.items() if k != "clients"}}


class RoundTracker:
    """Closes each round and records it."""

    def __init__(self, prepared: PreparedRun, grid: InstrumentedGrid,
                 reference: dict[str, torch.Tensor], *, start_round: int = 1) -> None:
        self.prepared, self.cfg, self.grid = prepared, prepared.cfg, grid
        self.reference = reference
        self.evaluator = (CentralEvaluator(self.cfg, prepared.dataset)
                          if self.cfg.fl.central_eval and prepared.dataset is not None
                          else None)
        self.progress = RoundProgress(self.cfg.rounds, enabled=self.cfg.output.progress,
                                      initial=start_round - 1)
        self.rounds: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.last_state: dict[str, torch.Tensor] = {}
        self.round_started = time.perf_counter()
        self.stopped: str | None = None
        self.secret_sampling = (PRIVACY_MODES.get(self.cfg.privacy.mode).secret_sampling
                                and not self.cfg.privacy.seeded_noise)

    def restore(self, state: ResumeState) -> None:
        """Continue after ``state``: its rounds are the run's history (metrics.jsonl too).

        If the run died between writing last.pt and best.pt, the checkpoint's round is
        the best one and its weights are the checkpoint's: best.pt is written here.
        """
        self.rounds, self.best = list(state.rounds), dict(state.best)
        self.last_state = {k: v.to(self.reference[k].dtype) for k, v in state.arrays.items()}
        self.prepared.recorder.rewrite_rounds(self.rounds)
        if self.best.get("round") == state.round and \
                self.prepared.recorder.checkpoint_round("best") != state.round:
            self.save_best(self.rounds[-1], self.last_state)
        self.reseed(state.round)

    def reseed(self, server_round: int) -> None:
        """Seed client sampling for round ``server_round + 1``.

        Flower samples clients with Python's ``random``; seeding per round keeps each
        round's sample independent of anything drawn in between (and of a resume).
        Under client-level DP the sample is part of the mechanism and must stay secret.
        """
        random.seed(secrets.randbits(64) if self.secret_sampling
                    else f"{self.cfg.seed}-{server_round + 1}")

    def __call__(self, server_round: int, arrays: ArrayRecord,
                 outcome: RoundOutcome | None) -> None:
        state = record_to_state_dict(arrays, self.reference)
        eval_started = time.perf_counter()
        test = self.evaluator(state) if self.evaluator else {}
        exchanges = self.grid.drain()
        record: dict[str, Any] = {
            "round": server_round, **_summarise(exchanges, "train"),
            **_summarise(exchanges, "evaluate"), **fairness(exchanges),
            **fairness(exchanges, "personal/accuracy"),
            **device_time(exchanges, self.cfg.hetero.deadline_s), **test,
            "central_eval_s": time.perf_counter() - eval_started,
            "wall_s": time.perf_counter() - self.round_started,
            "bytes_down": sum(e.bytes_down for e in exchanges),
            "bytes_up": sum(e.bytes_up for e in exchanges),
            **_counts(exchanges),
            "attempts": outcome.attempts if outcome else 0,
            "skipped": bool(outcome and outcome.skipped),
            **({"stopped": True} if outcome and outcome.stopped else {}),
            **self.strategy_privacy(),
            "clients": _clients(exchanges)}
        self.prepared.recorder.append_round(record)
        self.rounds.append(record)
        if server_round > 0 and fleet.enabled(self.cfg.hetero):
            log.info("round %d devices: %d sampled, %d offline, %d dropped, %d late, "
                     "%d aggregated", server_round, record["clients_sampled"],
                     record["clients_offline"], record["clients_dropped"],
                     record["clients_straggler"], record["clients_ok"])
        if outcome and outcome.stopped:  # recorded, but not a round to resume after
            return
        self.last_state = state
        improved = self._update_best(record)
        if server_round > 0:
            self.progress.update({k: record.get(k, float("nan")) for k in
                                  ("train/loss", "val/accuracy", "test/accuracy")})
        self.reseed(server_round)
        # last.pt first: a crash before best.pt is written is repaired on resume
        self.save_resume_state(server_round, arrays)
        if improved:
            self.save_best(record, state)
        self.round_started = time.perf_counter()

    def strategy_privacy(self) -> dict[str, float]:
        """Server-side privacy metrics (client-level DP), if the strategy keeps any."""
        report = getattr(self.prepared.strategy, "privacy_report", None)
        return report() if callable(report) else {}

    def save_resume_state(self, server_round: int, arrays: ArrayRecord) -> None:
        """Write ``checkpoints/last.pt``: everything needed to continue after this round.

        The global arrays are kept exactly as the strategy produced them (FedAdam's are
        float64), not cast to the model's dtypes, so the resumed rounds are bit-identical.
        """
        if not self.cfg.output.checkpoints:
            return
        exact = {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}
        resume = ResumeState(round=server_round, arrays=exact,
                             strategy=strategy_state(self.prepared.strategy),
                             # Under client-level DP the server's RNGs draw the noise
                             # and the client sample: never written to disk.
                             rng={} if self.secret_sampling else rng_state(),
                             rounds=self.rounds, best=self.best,
                             rejections=dict(self.grid.rejections),
                             ledgers=dict(self.grid.ledgers))
        payload = resume_payload(resume, self.cfg, list(self.prepared.classes))
        self.prepared.recorder.save_payload(RESUME_NAME, payload)

    def score(self, record: dict[str, Any]) -> float:
        """Model-selection score: ``output.select_metric`` (never a test-split metric).

        The default, federated validation balanced accuracy, does not reward a model
        for predicting the majority class of imbalanced local splits. Without federated
        evaluation it falls back to the train accuracy.
        """
        value = record.get(self.cfg.output.select_metric,
                           record.get("train/accuracy", float("nan")))
        return float("-inf") if value is None or value != value else float(value)

    def _update_best(self, record: dict[str, Any]) -> bool:
        """Make ``record`` the best round if it scores higher; True if it did."""
        if record["round"] == 0 or self.score(record) <= self.score(self.best or {}):
            return False
        self.best = {k: v for k, v in record.items() if k != "clients"}
        return True

    def save_best(self, record: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        """Write ``checkpoints/best.pt`` (if checkpoints are on)."""
        if self.cfg.output.checkpoints:
            self.prepared.recorder.save_checkpoint("best", state,
                                                   checkpoint_meta(self.prepared, record))
