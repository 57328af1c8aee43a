"""Callbacks: what happens at the end of every round, one job each (as in pfl-research).

The round loop calls every callback twice per round (round 0 = the initial model):
``metrics(state, result)`` returns what it adds to the round record, then
``on_record(state, result, record)`` acts on the finished record. ``on_run_end``
is called once, whether the run finished or stopped early. The order of
:func:`default_callbacks` is the order of the record's writing:

1. :class:`CentralEvaluation`: the global model on the server's test split (``test/*``);
2. :class:`ClientSummary`: fairness, device time, bytes and statuses of the clients;
3. :class:`StrategyReport`: the strategy's own metrics (client-level DP's epsilon);
4. :class:`MetricsWriter`: the record into ``metrics.jsonl``, and a fleet log line;
5. :class:`SelectBest`: model selection by ``output.select_metric``;
6. :class:`ResumeCheckpoint`: ``checkpoints/last.pt`` (the whole run state);
7. :class:`BestCheckpoint`, :class:`FinalCheckpoint`: ``best.pt``, ``final.pt``;
8. :class:`Progress`, then :class:`RoundTimer` (``wall_s``; last, so it times the rest).

To add one: subclass :class:`Callback`, override what you need, and put it in the list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedimg.config import FedimgConfig
from fedimg.reporting import RoundProgress, RunRecorder
from fedimg.serverapp.checkpoint import save_resume_state
from fedimg.serverapp.evaluation import CentralEvaluator
from fedimg.serverapp.loop import RoundResult
from fedimg.serverapp.round_record import exchange_summary
from fedimg.serverapp.state import RunState
from fedimg.simulation import fleet
from fedimg.transport.records import record_to_state_dict

log = logging.getLogger(__name__)

CheckpointMeta = Callable[[dict[str, Any]], dict[str, Any]]  # record -> checkpoint metadata


class Callback:
    """A do-nothing callback; subclasses override the hooks they need."""

    def metrics(self, state: RunState, result: RoundResult) -> dict[str, Any]:
        return {}

    def on_record(self, state: RunState, result: RoundResult, record: dict[str, Any]) -> None:
        return None

    def on_run_end(self, state: RunState) -> None:
        return None


class CentralEvaluation(Callback):
    """The global model on the held-out test split (``test/*``, ``central_eval_s``)."""

    def __init__(self, evaluator: CentralEvaluator) -> None:
        self.evaluator = evaluator

    def metrics(self, state: RunState, result: RoundResult) -> dict[str, Any]:
        started = time.perf_counter()
        test = self.evaluator(result.state_dict)
        return {**test, "central_eval_s": time.perf_counter() - started}


class ClientSummary(Callback):
    """Fairness, device time, bytes, counts and per-client entries; attempts and skips."""

    def __init__(self, deadline_s: float | None) -> None:
        self.deadline_s = deadline_s

    def metrics(self, state: RunState, result: RoundResult) -> dict[str, Any]:
        return {**exchange_summary(result.exchanges, deadline_s=self.deadline_s),
                "attempts": result.attempts, "skipped": result.skipped,
                **({"stopped": True} if result.stopped else {})}


class StrategyReport(Callback):
    """Server-side metrics a strategy keeps (client-level DP: ``dp/*``)."""

    def metrics(self, state: RunState, result: RoundResult) -> dict[str, Any]:
        report = getattr(state.strategy, "privacy_report", None)
        return report() if callable(report) else {}


class MetricsWriter(Callback):
    """Appends the record to the run state's history and to ``metrics.jsonl``."""

    def __init__(self, recorder: RunRecorder, *, fleet_log: bool = False) -> None:
        self.recorder, self.fleet_log = recorder, fleet_log

    def on_record(self, state: RunState, result: RoundResult, record: dict[str, Any]) -> None:
        state.rounds.append(record)
        self.recorder.append_round(record)
        if self.fleet_log and result.server_round > 0:
            log.info("round %d devices: %d sampled, %d offline, %d dropped, %d late, "
                     "%d aggregated", result.server_round, record["fleet/sampled"],
                     record["fleet/offline"], record["fleet/dropped"],
                     record["fleet/straggler"], record["fleet/ok"])


class SelectBest(Callback):
    """Model selection: the round with the best ``output.select_metric`` becomes ``state.best``.

    The default, federated validation balanced accuracy, does not reward a model for
    predicting the majority class of imbalanced local splits. Without federated
    evaluation it falls back to the train accuracy. Never a test-split metric.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def score(self, record: dict[str, Any]) -> float:
        value = record.get(self.metric, record.get("train/accuracy", float("nan")))
        return float("-inf") if value is None or value != value else float(value)

    def on_record(self, state: RunState, result: RoundResult, record: dict[str, Any]) -> None:
        if result.server_round == 0 or result.stopped:
            return
        if self.score(record) > self.score(state.best or {}):
            state.best = {k: v for k, v in record.items() if k != "clients"}


class ResumeCheckpoint(Callback):
    """``checkpoints/last.pt`` after every completed round: the whole run state."""

    def __init__(self, recorder: RunRecorder, cfg: FedimgConfig, classes: list[str]) -> None:
        self.recorder, self.cfg, self.classes = recorder, cfg, classes

    def on_record(self, state: RunState, result: RoundResult, record: dict[str, Any]) -> None:
        if not result.stopped:  # a stopped round is recorded, not a round to resume after
            save_resume_state(self.recorder, state, self.cfg, self.classes)


class BestCheckpoint(Callback):
    """``checkpoints/best.pt`` when this round became the best (after ``last.pt``)."""

    def __init__(self, recorder: RunRecorder, meta: CheckpointMeta) -> None:
        self.recorder, self.meta = recorder, meta

    def on_record(self, state: RunState, result: RoundResult, record: dict[str, Any]) -> None:
        if not result.stopped and state.best.get("round") == result.server_round > 0:
            self.recorder.save_checkpoint("best", result.state_dict, self.meta(record))


class FinalCheckpoint(Callback):
    """``checkpoints/final.pt`` at the end of the run: the last global model.

    A stopped round changes no weights, so the state's arrays are the last completed
    round's, whose record is the last one not marked ``stopped``.
    """

    def __init__(self, recorder: RunRecorder, meta: CheckpointMeta,
                 reference: Mapping[str, torch.Tensor]) -> None:
        self.recorder, self.meta, self.reference = recorder, meta, reference

    def on_run_end(self, state: RunState) -> None:
        record = next((r for r in reversed(state.rounds) if not r.get("stopped")), None)
        if record is not None:
            self.recorder.save_checkpoint(
                "final", record_to_state_dict(state.arrays, self.reference), self.meta(record))


class Progress(Callback):
    """The progress bar over rounds, with its ETA."""

    def __init__(self, rounds: int, *, enabled: bool, done: int) -> None:
        self.bar = RoundProgress(rounds, enabled=enabled, initial=done)

    def on_record(self, state: RunState, result: RoundResult, record: dict[str, Any]) -> None:
        if result.server_round > 0 and not result.stopped:
            self.bar.update({k: record.get(k, float("nan")) for k in
                             ("train/loss", "val/accuracy", "test/accuracy")})

    def on_run_end(self, state: RunState) -> None:
        self.bar.close()


class RoundTimer(Callback):
    """``wall_s``: seconds from the end of the previous round's callbacks to this record."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def metrics(self, state: RunState, result: RoundResult) -> dict[str, Any]:
        return {"wall_s": time.perf_counter() - self.started}

    def on_record(self, state: RunState, result: RoundResult, record: dict[str, Any]) -> None:
        self.started = time.perf_counter()


def default_callbacks(cfg: FedimgConfig, *, recorder: RunRecorder, classes: list[str],
                      evaluator: CentralEvaluator | None, meta: CheckpointMeta,
                      reference: Mapping[str, torch.Tensor], done: int) -> list[Callback]:
    """The callbacks of a run, in order (see the module docstring)."""
    saving = cfg.output.checkpoints
    return [
        *([CentralEvaluation(evaluator)] if evaluator is not None else []),
        ClientSummary(cfg.hetero.deadline_s), StrategyReport(),
        MetricsWriter(recorder, fleet_log=fleet.enabled(cfg.hetero)),
        SelectBest(cfg.output.select_metric),
        *([ResumeCheckpoint(recorder, cfg, classes), BestCheckpoint(recorder, meta),
           FinalCheckpoint(recorder, meta, reference)] if saving else []),
        Progress(cfg.rounds, enabled=cfg.output.progress, done=done), RoundTimer()]
