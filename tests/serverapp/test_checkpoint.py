"""The resume checkpoint: atomic writes, strategy state, and refusing the wrong run."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from offline_grid import OfflineGrid

from fedimg.config import FedimgConfig, FederationConfig, to_dict
from fedimg.errors import ConfigError
from fedimg.serverapp.checkpoint import (
    ResumeState,
    load_resume_state,
    restore_strategy_state,
    resume_payload,
    resumed_config,
    strategy_state,
)
from fedimg.transport.records import metric_record, reply_content
from fedimg.serverapp.strategies import build_strategy
from fedimg.reporting import RunRecorder
from fedimg.reporting.run_dir import write_json

CLASSES = ["normal", "pneumonia"]


def _round(strategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One FedAdam round in which node n moves the weights by n * round / 10."""
    random.seed(server_round)  # Flower's node sampling order, hence the float sums
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), OfflineGrid()))
    replies = []
    for m in messages:
        w = m.content["arrays"]["w"].numpy() + m.metadata.dst_node_id * server_round / 10
        content = reply_content(metrics=metric_record({}, num_examples=1),
                                arrays=ArrayRecord({"w": Array(w.astype(np.float32))}))
        replies.append(Message(content, reply_to=m))
    new, _ = strategy.aggregate_train(server_round, replies)
    return new


def test_fedadam_moments_survive_a_restore() -> None:
    # Arrange: FedAdam (fedimg's buffer-averaging subclass) and its state after round 2.
    cfg = FedimgConfig(strategy="fedadam", clients=3,
                       fl=FederationConfig(min_train_clients=3))
    first = build_strategy(cfg)
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    for r in (1, 2):
        arrays = _round(first, r, arrays)
    saved = pickle.loads(pickle.dumps(strategy_state(first)))  # as it goes to disk
    # Act: round 3 on the original and on a fresh strategy restored from the state
    expected = _round(first, 3, arrays)
    fresh = build_strategy(cfg)
    restore_strategy_state(fresh, saved)
    got = _round(fresh, 3, arrays)
    # Assert: identical bits; without the moments round 3 would differ
    np.testing.assert_array_equal(got["w"].numpy(), expected["w"].numpy())
    assert not np.array_equal(_round(build_strategy(cfg), 3, arrays)["w"].numpy(),
                              expected["w"].numpy())


def test_wrapped_strategy_state_recurses_into_the_inner_one() -> None:
    cfg = FedimgConfig(strategy="fedavg", clients=20, privacy=dataclasses.replace(
        FedimgConfig().privacy, mode="client_dp"), transfer=dataclasses.replace(
        FedimgConfig().transfer, bn="frozen"))
    wrapped = build_strategy(cfg)
    state = strategy_state(wrapped)
    assert "__strategy__" in state["strategy"] and "ledger" in state
    wrapped.ledger.history.append((1.0, 0.1, 1))
    fresh = build_strategy(cfg)
    restore_strategy_state(fresh, pickle.loads(pickle.dumps(strategy_state(wrapped))))
    assert fresh.ledger.history == [(1.0, 0.1, 1)]


def _save(run_dir: Path, cfg: FedimgConfig, round_: int, value: float) -> None:
    state = ResumeState(round=round_, arrays={"w": torch.full((2,), value)}, strategy={},
                        rng={}, rounds=[{"round": round_}], best={})
    RunRecorder(run_dir).save_payload("last", resume_payload(state, cfg, CLASSES))


def test_a_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    # Arrange: a good checkpoint of round 1
    cfg = FedimgConfig(rounds=5)
    _save(tmp_path, cfg, 1, 1.0)

    def dies_half_way(obj, handle, **kwargs) -> None:
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    # Act: writing round 2 dies after half the bytes
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, cfg, 2, 2.0)
    monkeypatch.undo()
    # Assert: round 1 still loads, and no temporary file is left behind
    state = load_resume_state(tmp_path, cfg, CLASSES)
    assert state.round == 1 and state.arrays["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.pt"]


def test_a_checkpoint_of_another_run_is_refused(tmp_path) -> None:
    cfg = FedimgConfig(rounds=5)
    _save(tmp_path, cfg, 2, 0.0)
    with pytest.raises(ConfigError, match="holds a 'efficientnet_lite0' model; this run uses"):
        load_resume_state(tmp_path, dataclasses.replace(cfg, model="resnet18"), CLASSES)
    with pytest.raises(ConfigError, match="trained on 2 classes"):
        load_resume_state(tmp_path, cfg, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="different config"):
        load_resume_state(tmp_path, dataclasses.replace(cfg, seed=1), CLASSES)
    # rounds may change (extending a run), the rest may not
    assert load_resume_state(tmp_path, dataclasses.replace(cfg, rounds=9), CLASSES).round == 2
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        load_resume_state(tmp_path, cfg, CLASSES)
    with pytest.raises(ConfigError, match="has no last.pt"):
        load_resume_state(tmp_path / "nowhere", cfg, CLASSES)


def test_resumed_config_takes_the_saved_one_and_only_safe_overrides(tmp_path) -> None:
    cfg = FedimgConfig(rounds=4, seed=7)
    write_json(tmp_path / "config.json", {"config": to_dict(cfg), "seed": 7})
    resumed = resumed_config(tmp_path, ["rounds=6", "sim.num_cpus_per_client=2",
                                        "fl.timeout_s=1e3"])
    assert (resumed.rounds, resumed.seed, resumed.sim.num_cpus_per_client) == (6, 7, 2.0)
    assert resumed.fl.timeout_s == 1000.0
    assert resumed.output.run_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="'train.lr=0.1' cannot change a resumed run"):
        resumed_config(tmp_path, ["train.lr=0.1"])
    with pytest.raises(ConfigError, match="has no config.json"):
        resumed_config(tmp_path / "missing", [])


def test_last_pt_is_a_model_checkpoint_too(tmp_path) -> None:
    # weights=<run>/checkpoints/last.pt must load without unpickling arbitrary objects.
    _save(tmp_path, FedimgConfig(), 3, 0.5)
    payload = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert payload["meta"]["round"] == 3 and payload["state_dict"]["w"].tolist() == [0.5, 0.5]
    assert RunRecorder(tmp_path).checkpoint_round("last") == 3
