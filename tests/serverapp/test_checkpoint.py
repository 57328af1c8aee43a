"""The resume checkpoint: atomic writes, strategy and run state restored, the wrong run refused."""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from offline_grid import OfflineGrid, fedavg

from fedimg.config import FedimgConfig, FederationConfig, to_dict
from fedimg.errors import ConfigError
from fedimg.serverapp.checkpoint import (
    config_digest,
    load_resume_state,
    repair_best,
    restore_run_state,
    restore_strategy_state,
    resumed_config,
    save_resume_state,
    strategy_state,
)
from fedimg.serverapp.state import RunState, Sampler
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


def _state(round_: int = 0, value: float = 0.0, **fields) -> RunState:
    return RunState(arrays=ArrayRecord({"w": Array(np.full(2, value, np.float32))}),
                    strategy=fedavg(), sampler=Sampler(0), round=round_,
                    rounds=fields.pop("rounds", [{"round": round_}]), **fields)


def _save(run_dir: Path, cfg: FedimgConfig, round_: int, value: float, **fields) -> None:
    save_resume_state(RunRecorder(run_dir), _state(round_, value, **fields), cfg, CLASSES)


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


def test_a_restore_brings_back_the_whole_run_state(tmp_path) -> None:
    # Arrange: after round 3 of a run whose rounds 2 and 3 were skipped; client 1 had two
    # updates rejected; clients 0 and 2 reported DP ledgers; best was round 1.
    cfg = FedimgConfig(rounds=5)
    rounds = [{"round": 0}, {"round": 1}, {"round": 2, "skipped": True},
              {"round": 3, "skipped": True}]
    _save(tmp_path, cfg, 3, 0.5, rounds=rounds, best={"round": 1, "val/accuracy": 0.7},
          rejections=Counter({1: 2}), ledgers={0: "L0", 2: "L2"})
    recorder = RunRecorder(tmp_path)
    recorder.rewrite_rounds(rounds + [{"round": 4}])  # a round the killed run half-wrote
    stale = tmp_path / "checkpoints" / ".last.pt.x1y2"
    stale.write_bytes(b"half")
    fresh = _state()
    # Act: client 2 reported a newer ledger (ledgers.json) before the run died
    restore_run_state(fresh, load_resume_state(tmp_path, cfg, CLASSES), recorder=recorder,
                      reported_ledgers={2: "L2-newer"})
    # Assert
    assert fresh.round == 3 and fresh.arrays["w"].numpy().tolist() == [0.5, 0.5]
    assert fresh.rounds == rounds and fresh.best == {"round": 1, "val/accuracy": 0.7}
    assert fresh.rejections == Counter({1: 2})
    assert fresh.ledgers == {0: "L0", 2: "L2-newer"} and fresh.ledgers_to_return == {0, 2}
    assert fresh.skips == 2  # rounds 2 and 3, in a row at the end
    assert [r["round"] for r in recorder.read_rounds()] == [0, 1, 2, 3]
    assert not stale.exists()


def test_a_missing_best_checkpoint_is_repaired_from_the_resume_one(tmp_path) -> None:
    # Arrange: the run died after last.pt of its best round 2, before best.pt.
    cfg, recorder = FedimgConfig(rounds=5), RunRecorder(tmp_path)
    _save(tmp_path, cfg, 2, 0.25, rounds=[{"round": 0}, {"round": 1}, {"round": 2}],
          best={"round": 2})
    state = _state()
    saved = load_resume_state(tmp_path, cfg, CLASSES)
    restore_run_state(state, saved, recorder=recorder, reported_ledgers={})
    reference = {"w": torch.zeros(2, dtype=torch.float16)}
    # Act
    repair_best(state, saved, recorder=recorder, reference=reference,
                meta=lambda record: {"round": record["round"]})
    # Assert: best.pt is round 2's weights, in the model's dtype
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["meta"]["round"] == 2 and best["state_dict"]["w"].dtype == torch.float16
    assert best["state_dict"]["w"].tolist() == [0.25, 0.25]


def test_the_config_digest_ignores_what_a_resume_may_change() -> None:
    cfg = FedimgConfig(rounds=4, seed=7)
    same = [dataclasses.replace(cfg, rounds=9),
            dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, run_dir="/x")),
            dataclasses.replace(cfg, sim=dataclasses.replace(cfg.sim, num_cpus_per_client=4))]
    assert {config_digest(c) for c in same} == {config_digest(cfg)}
    assert config_digest(dataclasses.replace(cfg, seed=8)) != config_digest(cfg)


def test_secret_sampling_keeps_the_server_random_state_off_disk(tmp_path) -> None:
    # Under client-level DP the sample and the noise come from the server's RNGs.
    state = _state(1)
    state.sampler = Sampler(0, secret=True)
    save_resume_state(RunRecorder(tmp_path), state, FedimgConfig(rounds=5), CLASSES)
    saved = load_resume_state(tmp_path, FedimgConfig(rounds=5), CLASSES)
    assert saved.extra["rng"] == {}
    _save(tmp_path, FedimgConfig(rounds=5), 1, 0.0)
    assert set(load_resume_state(tmp_path, FedimgConfig(rounds=5), CLASSES).extra["rng"]) == {
        "numpy", "torch"}
