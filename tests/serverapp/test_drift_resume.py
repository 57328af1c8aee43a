"""SCAFFOLD in fedimg's round loop: control variates through a checkpoint and hostile replies.

The clients are scripted: client i minimises 1/2 ||w - t_i||^2 with K_i = i + 1 plain SGD
steps of lr 0.1, each gradient corrected by the offset its message carries (c - c_i),
exactly as train_local would. Two of three clients are sampled per round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Message
from offline_grid import OfflineGrid, answer, offline_loop, update

from fedimg.config import FedimgConfig, FederationConfig, TrainConfig
from fedimg.reporting import RunRecorder
from fedimg.serverapp.checkpoint import load_resume_state, restore_run_state, save_resume_state
from fedimg.serverapp.strategies import build_strategy
from fedimg.transport.records import GRAD_OFFSET_KEY

CFG = FedimgConfig(strategy="scaffold", clients=3, rounds=4,
                   train=TrainConfig(lr=0.1, momentum=0.0),
                   fl=FederationConfig(fraction_train=0.67, min_train_clients=2,
                                       fraction_evaluate=0.0, min_evaluate_clients=0))
TARGETS = {0: [1.0, 0.0], 1: [0.0, 2.0], 2: [-1.0, -1.0]}
REFERENCE = {"w": torch.zeros(2)}


class ScriptedClients(OfflineGrid):
    """Nodes ``first_node + i`` are client i; ``hostile`` maps (round, client) to a reply."""

    def __init__(self, first_node: int = 1, hostile: dict | None = None) -> None:
        self.node_ids = [first_node + i for i in range(3)]
        self.first_node, self.hostile, self.round = first_node, hostile or {}, 0

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for m in messages:
            client = m.metadata.dst_node_id - self.first_node
            server_round = int(m.content["config"]["server-round"])
            w = m.content["arrays"]["w"].numpy().astype(np.float32)
            offset = (m.content[GRAD_OFFSET_KEY]["w"].numpy() if GRAD_OFFSET_KEY in m.content
                      else np.zeros(2, np.float32))
            steps = client + 1
            for _ in range(steps):
                w = w - np.float32(0.1) * ((w - np.float32(TARGETS[client])) + offset)
            content = self.hostile.get((server_round, client),
                                       update(w, num_examples=10, **{"train/steps": steps}))
            replies.append(answer(m, content))
        return replies


class Checkpoints:
    """Saves last.pt after every round, as ResumeCheckpoint does; 'dies' after ``kill_after``."""

    def __init__(self, run_dir, kill_after: int | None = None) -> None:
        self.recorder, self.kill_after = RunRecorder(run_dir), kill_after

    def metrics(self, state, result) -> dict:
        return {}

    def on_record(self, state, result, record) -> None:
        state.rounds.append(record)
        if record["round"] > 0:
            save_resume_state(self.recorder, state, CFG, ["a", "b"])
        if record["round"] == self.kill_after:
            raise KeyboardInterrupt("kill -9")

    def on_run_end(self, state) -> None:
        return None


def _loop(grid: OfflineGrid, callbacks=(), cfg: FedimgConfig = CFG):
    return offline_loop(cfg, grid, reference=REFERENCE, strategy=build_strategy(cfg),
                        callbacks=callbacks,
                        node_to_partition={n: n - grid.first_node for n in grid.node_ids})


def _controls(strategy) -> dict:
    return {"c": strategy.control["w"].tolist(),
            **{i: c["w"].tolist() for i, c in sorted(strategy.client_controls.items())}}


def test_scaffold_killed_after_round_2_and_resumed_ends_identical(tmp_path) -> None:
    # Arrange: an uninterrupted run of 4 rounds
    clean = _loop(ScriptedClients(), [Checkpoints(tmp_path / "clean")])
    clean.run()
    # Act: a run that dies after round 2's checkpoint, resumed by a new server whose nodes
    # have new ids (a restarted simulation numbers them afresh)
    killed = _loop(ScriptedClients(), [Checkpoints(tmp_path / "killed", kill_after=2)])
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    resumed = _loop(ScriptedClients(first_node=11), [Checkpoints(tmp_path / "killed")])
    saved = load_resume_state(tmp_path / "killed", CFG, ["a", "b"])
    restore_run_state(resumed.state, saved, recorder=RunRecorder(tmp_path / "killed"),
                      reported_ledgers={})
    assert resumed.state.round == 2 and resumed.state.strategy.client_controls  # restored
    resumed.run()
    # Assert: the same global model and the same c and c_i, to the bit
    assert resumed.state.round == 4
    np.testing.assert_array_equal(resumed.state.arrays["w"].numpy(),
                                  clean.state.arrays["w"].numpy())
    assert _controls(resumed.state.strategy) == _controls(clean.state.strategy)
    assert len(clean.state.strategy.client_controls) == 3  # every client trained by round 4
    # ... and a resume that lost the controls (only the model restored) ends elsewhere
    forgetful = _loop(ScriptedClients(first_node=21))
    restore_run_state(forgetful.state, saved, recorder=RunRecorder(tmp_path / "forgetful"),
                      reported_ledgers={})
    forgetful.state.strategy.control, forgetful.state.strategy.client_controls = {}, {}
    forgetful.run()
    assert not np.array_equal(forgetful.state.arrays["w"].numpy(),
                              clean.state.arrays["w"].numpy())


class Snapshots:
    """Keeps each round's exchanges and a copy of the strategy's controls after it."""

    def __init__(self) -> None:
        self.exchanges, self.controls = {}, {}

    def metrics(self, state, result) -> dict:
        return {}

    def on_record(self, state, result, record) -> None:
        self.exchanges[result.server_round] = result.exchanges
        self.controls[result.server_round] = _controls(state.strategy) \
            if state.strategy.control else {}

    def on_run_end(self, state) -> None:
        return None


def test_a_rejected_reply_moves_neither_its_client_control_nor_c() -> None:
    # Arrange: all three clients train in both rounds; in round 2 client 0 replies NaN
    # weights and client 1 claims 0 local steps; client 2 is honest.
    cfg = dataclasses.replace(CFG, rounds=2, fl=dataclasses.replace(CFG.fl, fraction_train=1.0))
    nan = update(np.array([np.nan, 0.0], np.float32), num_examples=10, **{"train/steps": 1})
    zero = update(np.zeros(2, np.float32), num_examples=10, **{"train/steps": 0})
    snapshots = Snapshots()
    loop = _loop(ScriptedClients(hostile={(2, 0): nan, (2, 1): zero}), [snapshots], cfg=cfg)
    # Act
    loop.run()
    # Assert: both hostile replies were rejected with their reasons; the round went on
    status = {e.partition_id: (e.status, e.reason) for e in snapshots.exchanges[2]}
    assert status[0][0] == status[1][0] == "rejected" and status[2] == ("ok", "")
    assert "NaN" in status[0][1] and "whole number of local steps" in status[1][1]
    # c_0 and c_1 are as after round 1; c moved by client 2's delta / N only
    before, after = snapshots.controls[1], snapshots.controls[2]
    assert after[0] == before[0] and after[1] == before[1]
    moved = np.subtract(after["c"], before["c"])
    np.testing.assert_allclose(moved, np.subtract(after[2], before[2]) / 3, atol=1e-6)
