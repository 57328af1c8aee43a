"""The run state as JSON and tensors: round trips, and a hostile last.pt that is refused."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedimg.config import FedimgConfig, PrivacyConfig, TransferConfig
from fedimg.errors import ConfigError
from fedimg.reporting import RunRecorder
from fedimg.serverapp.checkpoint import (
    load_resume_state,
    restore_strategy_state,
    save_resume_state,
    strategy_state,
)
from fedimg.serverapp.state import RunState, Sampler, global_rng_state
from fedimg.serverapp.state_codec import decode, encode
from fedimg.serverapp.strategies import build_strategy


def test_every_kind_of_value_round_trips_exactly() -> None:
    # Arrange: what strategies, RNGs and records hold
    value = {"m_t": {"w": np.arange(6, dtype=np.float64).reshape(2, 3)},
             "rng": np.random.get_state(), "torch": torch.get_rng_state(),
             "keys": frozenset({"bn.running_var", "bn.running_mean"}),
             "rejections": {3: 2, 0: 1}, "nan": float("nan"), "none": None,
             "arrays": ArrayRecord({"a": Array(np.array([1.5, -2.0], dtype=np.float32)),
                                    "n": Array(np.array(7, dtype=np.int64))}),
             "scalar": np.float32(0.25), "list": [1, "two", (3, 4.0)]}
    tensors: dict[str, torch.Tensor] = {}
    # Act
    back = decode(json.loads(json.dumps(encode(value, tensors))), tensors)
    # Assert
    np.testing.assert_array_equal(back["m_t"]["w"], value["m_t"]["w"])
    assert back["m_t"]["w"].dtype == np.float64
    assert back["rng"][0] == "MT19937" and back["rng"][2:] == value["rng"][2:]
    np.testing.assert_array_equal(back["rng"][1], value["rng"][1])
    assert torch.equal(back["torch"], value["torch"])
    assert back["keys"] == value["keys"] and back["rejections"] == {3: 2, 0: 1}
    assert back["nan"] != back["nan"] and back["none"] is None
    assert back["arrays"]["a"].numpy().tolist() == [1.5, -2.0]
    assert back["arrays"]["n"].numpy().dtype == np.int64 and back["arrays"]["n"].numpy() == 7
    assert back["scalar"] == 0.25 and back["list"] == [1, "two", (3, 4.0)]


def test_an_unknown_type_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"state.x is a object"):
        encode({"x": object()}, {})


def test_a_client_dp_strategy_state_round_trips(tmp_path: Path) -> None:
    # Arrange: client-level DP keeps a privacy ledger and Flower's wrapper state
    cfg = FedimgConfig(clients=10, transfer=TransferConfig(bn="frozen"),
                       privacy=dataclasses.replace(PrivacyConfig(), mode="client_dp"))
    strategy = build_strategy(cfg)
    strategy.ledger.record(2)
    tensors: dict[str, torch.Tensor] = {}
    # Act
    saved = decode(json.loads(json.dumps(encode(strategy_state(strategy), tensors))), tensors)
    fresh = build_strategy(cfg)
    restore_strategy_state(fresh, saved)
    # Assert: two releases are remembered, epsilon equals the original's
    assert fresh.ledger.steps == 2
    assert fresh.ledger.spent() == pytest.approx(strategy.ledger.spent(), rel=1e-12)


def _saved_run(tmp_path: Path) -> tuple[Path, FedimgConfig]:
    cfg = FedimgConfig(strategy="fedadam", output=dataclasses.replace(
        FedimgConfig().output, run_dir=str(tmp_path)))
    strategy = build_strategy(cfg)
    strategy.m_t = {"w": np.full(3, 0.5)}
    state = RunState(arrays=ArrayRecord({"w": Array(np.ones(3, dtype=np.float64))}),
                     strategy=strategy, sampler=Sampler(0), round=2,
                     rounds=[{"round": 0}, {"round": 1}, {"round": 2, "skipped": True}],
                     best={"round": 1})
    state.rejections[4] = 3
    save_resume_state(RunRecorder(tmp_path), state, cfg, ["a", "b"])
    return tmp_path / "checkpoints" / "last.pt", cfg


def test_last_pt_loads_with_weights_only(tmp_path: Path) -> None:
    # Arrange
    path, cfg = _saved_run(tmp_path)
    # Act: the plain safe loader reads it whole
    payload = torch.load(path, weights_only=True)
    saved = load_resume_state(tmp_path, cfg, ["a", "b"])
    # Assert
    assert isinstance(payload["state_json"], str)
    assert saved.round == 2 and saved.arrays["w"].dtype == torch.float64
    np.testing.assert_array_equal(saved.extra["strategy"]["m_t"]["w"], np.full(3, 0.5))
    assert saved.extra["rejections"] == {4: 3} and saved.extra["best"] == {"round": 1}
    assert set(saved.extra["rng"]) == set(global_rng_state())


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (Path.write_text, (self.target, "owned"))


def test_a_crafted_last_pt_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    # Arrange: a last.pt whose unpickling would write a file
    _, cfg = _saved_run(tmp_path)
    target = tmp_path / "created-by-payload"
    torch.save({"meta": {"format": 2}, "state_json": "{}", "evil": _Payload(target)},
               tmp_path / "checkpoints" / "last.pt")
    # Act / Assert
    with pytest.raises(ConfigError, match="unreadable"):
        load_resume_state(tmp_path, cfg, ["a", "b"])
    assert not target.exists()


def test_a_pickled_format_1_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    # Arrange: the old layout, a pickle blob in a byte tensor
    _, cfg = _saved_run(tmp_path)
    blob = pickle.dumps({"strategy": {}})
    torch.save({"state_dict": {}, "meta": {"format": 1, "round": 1},
                "resume": torch.frombuffer(bytearray(blob), dtype=torch.uint8)},
               tmp_path / "checkpoints" / "last.pt")
    # Act / Assert
    with pytest.raises(ConfigError, match="older fedimg .* not loaded"):
        load_resume_state(tmp_path, cfg, ["a", "b"])
