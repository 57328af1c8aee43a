"""End-of-round callbacks: the record, model selection, checkpoints, and a resume from them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType
from offline_grid import OfflineGrid, answer, fedavg, offline_loop, update

from fedimg.config import FedimgConfig, FederationConfig, OutputConfig
from fedimg.reporting import RunRecorder
from fedimg.serverapp.callbacks import (
    BestCheckpoint,
    CentralEvaluation,
    ClientSummary,
    FinalCheckpoint,
    MetricsWriter,
    ResumeCheckpoint,
    RoundTimer,
    SelectBest,
    StrategyReport,
    default_callbacks,
)
from fedimg.serverapp.checkpoint import load_resume_state, restore_run_state
from fedimg.serverapp.loop import RoundResult
from fedimg.serverapp.state import RunState, Sampler
from fedimg.transport.records import LEDGER_KEY, metric_record, reply_content

REFERENCE = {"w": torch.zeros(3)}
CLASSES = ["normal", "pneumonia"]
METRIC = "val/balanced_accuracy"


def _state() -> RunState:
    return RunState(arrays=ArrayRecord(), strategy=fedavg(), sampler=Sampler(0))


def _result(server_round: int, **fields) -> RoundResult:
    return RoundResult(server_round, {"w": torch.zeros(3)}, **fields)


def _select(records: list[tuple[RoundResult, dict]], metric: str = METRIC) -> dict:
    state, best = _state(), SelectBest(metric)
    for result, record in records:
        best.on_record(state, result, record)
    return state.best


# -- one callback at a time ----------------------------------------------------------------

def test_select_best_picks_by_the_select_metric_ignoring_round_0_and_stopped_rounds() -> None:
    best = _select([(_result(0), {"round": 0, METRIC: 0.99}),
                    (_result(1), {"round": 1, METRIC: 0.6, "clients": {"0": {}}}),
                    (_result(2), {"round": 2, METRIC: 0.8, "clients": {"0": {}}}),
                    (_result(3), {"round": 3, METRIC: 0.7}),
                    (_result(4, stopped=True), {"round": 4, METRIC: 0.95})])
    assert best == {"round": 2, METRIC: 0.8}  # the per-client entries left out


def test_select_best_falls_back_to_train_accuracy_and_never_picks_nan() -> None:
    # No federated evaluation: train/accuracy decides; a NaN score loses to anything.
    best = _select([(_result(1), {"round": 1, "train/accuracy": 0.4}),
                    (_result(2), {"round": 2, "train/accuracy": 0.5}),
                    (_result(3), {"round": 3, METRIC: float("nan"), "train/accuracy": 0.9})])
    assert best["round"] == 2


def test_the_record_gets_the_summary_the_strategys_report_and_the_times() -> None:
    # Arrange
    state = _state()
    state.strategy.privacy_report = lambda: {"dp/epsilon": 1.5}
    central = CentralEvaluation(lambda state_dict: {"test/accuracy": 0.625})
    result = _result(2, attempts=3, skipped=True)
    # Act
    record = {}
    for callback in (central, ClientSummary(None), StrategyReport(), RoundTimer()):
        record.update(callback.metrics(state, result))
    # Assert
    assert record["test/accuracy"] == 0.625 and record["central_eval_s"] >= 0
    assert (record["attempts"], record["skipped"], record["fleet/sampled"]) == (3, True, 0)
    assert "stopped" not in record and record["dp/epsilon"] == 1.5
    assert record["wall_s"] >= 0
    assert ClientSummary(None).metrics(state, _result(3, stopped=True))["stopped"] is True


def test_the_metrics_writer_keeps_the_record_in_the_state_and_the_file(tmp_path) -> None:
    state, recorder = _state(), RunRecorder(tmp_path)
    writer = MetricsWriter(recorder)
    for r in (0, 1):
        writer.on_record(state, _result(r), {"round": r, "train/loss": 1.0 / (r + 1)})
    assert state.rounds == [{"round": 0, "train/loss": 1.0}, {"round": 1, "train/loss": 0.5}]
    assert recorder.read_rounds() == state.rounds


def test_a_stopped_round_is_recorded_but_never_checkpointed(tmp_path) -> None:
    # Arrange: round 2 stopped the run (a spent budget); round 1 was the best.
    recorder, state = RunRecorder(tmp_path), _state()
    state.arrays = ArrayRecord({"w": Array(np.full(3, 0.5, np.float32))})
    state.round, state.best = 1, {"round": 2}
    state.rounds = [{"round": 0}, {"round": 1}, {"round": 2, "stopped": True}]
    meta = lambda record: {"round": record["round"]}  # noqa: E731
    # Act
    ResumeCheckpoint(recorder, _cfg(3), CLASSES).on_record(state, _result(2, stopped=True), {})
    BestCheckpoint(recorder, meta).on_record(state, _result(2, stopped=True), {"round": 2})
    FinalCheckpoint(recorder, meta, REFERENCE).on_run_end(state)
    # Assert: no last.pt or best.pt for it; final.pt is round 1's model
    assert recorder.checkpoint_round("last") is None and recorder.checkpoint_round("best") is None
    assert _checkpoint(tmp_path, "final") == (1, [0.5, 0.5, 0.5])


# -- the default callbacks over a round loop -----------------------------------------------

class _Clients(OfflineGrid):
    """Clients n = 1, 2, 3 add n to the weights, weigh n examples, and report the round's
    validation score ``scores[round]``. In ``nan_round`` node 3 sends NaN weights; in
    ``dead_round`` every client fails; in round 1 node 1 reports a DP ledger."""

    def __init__(self, scores: dict[int, float], *, nan_round: int = 0,
                 dead_round: int = 0) -> None:
        self.scores, self.nan_round, self.dead_round = scores, nan_round, dead_round
        self.ledgers_received: list[tuple[int, str]] = []  # (round, ledger) at node 1

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            node, r = m.metadata.dst_node_id, int(m.content["config"]["server-round"])
            if m.metadata.message_type == MessageType.EVALUATE:
                replies.append(answer(m, reply_content(metrics=metric_record(
                    {METRIC: self.scores[r]}, num_examples=node))))
                continue
            if node == 1 and LEDGER_KEY in m.content.config_records:
                self.ledgers_received.append((r, str(m.content[LEDGER_KEY]["json"])))
            if r == self.dead_round:
                replies.append(answer(m, Error(code=0, reason="worker died")))
                continue
            w = m.content["arrays"]["w"].numpy() + node
            content = update(np.full(3, np.nan, np.float32) if (r, node) == (
                self.nan_round, 3) else w, num_examples=node)
            if (r, node) == (1, 1):
                content[LEDGER_KEY] = ConfigRecord({"json": "L1"})
            replies.append(answer(m, content))
        return replies


def _cfg(rounds: int) -> FedimgConfig:
    return FedimgConfig(rounds=rounds, clients=3, output=OutputConfig(progress=False),
                        fl=FederationConfig(min_train_clients=3, min_evaluate_clients=3,
                                            on_too_few="skip"))


def _run_loop(run_dir: Path, cfg: FedimgConfig, grid: _Clients, *, resume: bool = False):
    recorder = RunRecorder(run_dir)
    done = (recorder.checkpoint_round("last") or 0) if resume else 0
    callbacks = default_callbacks(cfg, recorder=recorder, classes=CLASSES, evaluator=None,
                                  meta=lambda record: {"round": record["round"]},
                                  reference=REFERENCE, done=done)
    loop = offline_loop(cfg, grid, reference=REFERENCE, callbacks=callbacks)
    if resume:
        restore_run_state(loop.state, load_resume_state(run_dir, cfg, CLASSES),
                          recorder=recorder, reported_ledgers={})
    return loop, recorder


def _finish(loop) -> None:
    loop.run()
    for callback in loop.callbacks:
        callback.on_run_end(loop.state)


def _checkpoint(run_dir: Path, name: str) -> tuple[int, list[float]]:
    payload = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
    return payload["meta"]["round"], payload["state_dict"]["w"].tolist()


def test_checkpoints_are_written_last_best_and_final(tmp_path) -> None:
    # Arrange: validation scores 0.5, 0.9, 0.7 in rounds 1..3; each round adds
    # (1 + 4 + 9) / 6 = 14/6 to the weights.
    loop, recorder = _run_loop(tmp_path, _cfg(3), _Clients({1: 0.5, 2: 0.9, 3: 0.7}))
    # Act
    _finish(loop)
    # Assert
    assert [r["round"] for r in recorder.read_rounds()] == [0, 1, 2, 3]
    assert loop.state.best["round"] == 2 and loop.state.best[METRIC] == pytest.approx(0.9)
    assert recorder.checkpoint_round("last") == 3
    round_, w = _checkpoint(tmp_path, "best")
    assert round_ == 2 and w == pytest.approx([2 * 14 / 6] * 3)
    round_, w = _checkpoint(tmp_path, "final")
    assert round_ == 3 and w == pytest.approx([3 * 14 / 6] * 3)


def test_a_resumed_run_restores_rejections_ledgers_and_skips(tmp_path) -> None:
    # Arrange: a 2-round run. Round 1: client 2 (node 3) sends NaN and is rejected, the
    # others give (1 x 1 + 2 x 2) / 3 = 5/3; client 0 reports its ledger. Round 2: every
    # client fails, the round is skipped. The run then ends (or is killed).
    scores = {1: 0.5, 2: 0.6, 3: 0.7}
    first, _ = _run_loop(tmp_path / "run", _cfg(2), _Clients(scores, nan_round=1,
                                                             dead_round=2))
    _finish(first)
    # Act: resume it with rounds=3 (a resume may extend a run)
    grid = _Clients(scores)
    loop, recorder = _run_loop(tmp_path / "run", _cfg(3), grid, resume=True)
    # Assert: the restored state is the one the first run ended with
    assert loop.state.round == 2 and loop.state.skips == 1
    assert dict(loop.state.rejections) == {2: 1}
    assert loop.state.ledgers == {0: "L1"} and loop.state.ledgers_to_return == {0}
    # ... and the resumed round 3 ends where an unbroken 3-round run does.
    _finish(loop)
    unbroken, _ = _run_loop(tmp_path / "unbroken", _cfg(3),
                            _Clients(scores, nan_round=1, dead_round=2))
    _finish(unbroken)
    np.testing.assert_array_equal(loop.state.arrays["w"].numpy(),
                                  unbroken.state.arrays["w"].numpy())
    assert loop.state.arrays["w"].numpy() == pytest.approx([5 / 3 + 14 / 6] * 3)
    assert grid.ledgers_received == [(3, "L1")]  # handed back to client 0 in round 3
    assert [r["round"] for r in recorder.read_rounds()] == [0, 1, 2, 3]
    assert [r["skipped"] for r in recorder.read_rounds()[1:]] == [False, True, False]
    assert loop.state.skips == 0 and dict(loop.state.rejections) == {2: 1}
