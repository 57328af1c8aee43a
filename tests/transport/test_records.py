"""Torch <-> Flower record translation, update validation, metric aggregation, partitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedimg.config import FedimgConfig
from fedimg.data import ClientPartition
from fedimg.errors import UpdateError
from fedimg.transport.records import (
    aggregate_metrics,
    config_from_record,
    config_record,
    metric_record,
    partitions_from_record,
    partitions_record,
    record_bytes,
    record_to_state_dict,
    reply_content,
    state_dict_to_record,
)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64)}


def test_state_dict_round_trip_keeps_values_and_dtypes() -> None:
    state = _state()
    back = record_to_state_dict(state_dict_to_record(state), state)
    assert torch.equal(back["w"], state["w"])
    assert back["bn.num_batches_tracked"].dtype == torch.int64
    assert record_bytes(state_dict_to_record(state)) > 6 * 4


def test_averaged_int_buffers_are_cast_back() -> None:
    state = _state()
    record = _record({"w": state["w"].numpy(), "bn.num_batches_tracked": np.array(6.5)})
    back = record_to_state_dict(record, state)
    assert back["bn.num_batches_tracked"].dtype == torch.int64
    assert int(back["bn.num_batches_tracked"]) == 6


@pytest.mark.parametrize(("arrays", "message"), [
    ({"w": np.zeros((3, 2), np.float32), "bn.num_batches_tracked": np.array(1)}, "shape"),
    ({"w": np.full((2, 3), np.nan, np.float32), "bn.num_batches_tracked": np.array(1)}, "NaN"),
    ({"w": np.full((2, 3), np.inf, np.float32), "bn.num_batches_tracked": np.array(1)}, "Inf"),
    ({"w": np.zeros((2, 3), np.float32)}, "missing"),
])
def test_malformed_updates_are_refused(arrays, message) -> None:
    with pytest.raises(UpdateError, match=message):
        record_to_state_dict(_record(arrays), _state())


def test_config_travels_as_json_with_kebab_extras() -> None:
    cfg = FedimgConfig(rounds=4)
    record = config_record(cfg, server_round=2)
    assert record["server-round"] == 2
    assert config_from_record(record) == cfg


def _reply(arrays: dict[str, np.ndarray], n: int, **metrics: float) -> Message:
    content = reply_content(metrics=metric_record(metrics, num_examples=n),
                            arrays=_record(arrays))
    # A reply as the strategy sees it: content only (no run context needed here).
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)


def test_fedavg_weights_by_examples_by_hand() -> None:
    # Arrange: client A has 1 example and weights 1, client B 3 examples and weights 5.
    replies = [_reply({"w": np.ones(2, np.float32)}, 1, loss=1.0),
               _reply({"w": np.full(2, 5.0, np.float32)}, 3, loss=2.0)]
    strategy = FedAvg(train_metrics_aggr_fn=aggregate_metrics)
    # Act
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: (1*1 + 3*5) / 4 = 4 ; loss (1*1 + 3*2) / 4 = 1.75
    np.testing.assert_allclose(arrays["w"].numpy(), [4.0, 4.0])
    assert metrics["loss"] == pytest.approx(1.75)


def test_metric_aggregation_skips_nan() -> None:
    records = [RecordDict({"m": MetricRecord({"num-examples": 10, "auc": float("nan"),
                                              "acc": 0.5})}),
               RecordDict({"m": MetricRecord({"num-examples": 30, "auc": 0.9, "acc": 0.9})})]
    out = aggregate_metrics(records, "num-examples")
    assert out["auc"] == pytest.approx(0.9)
    assert out["acc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    all_nan = [RecordDict({"m": MetricRecord({"num-examples": 5, "auc": float("nan")})})]
    assert math.isnan(aggregate_metrics(all_nan, "num-examples")["auc"])


def _partitions() -> list[ClientPartition]:
    return [ClientPartition(0, np.array([5, 1, 2]), np.array([7])),
            ClientPartition(1, np.array([0, 3]), np.array([4, 6]))]


def test_partitions_travel_as_sizes_and_indices_back_to_back() -> None:
    # Arrange: client 0 trains on 3 images and validates on 1; client 1 on 2 and 2.
    # Act
    record = partitions_record(_partitions())
    # Assert: sizes [[3, 1], [2, 2]]; indices in client, then train/val order.
    assert record["sizes"].numpy().tolist() == [[3, 1], [2, 2]]
    assert record["indices"].numpy().tolist() == [5, 1, 2, 7, 0, 3, 4, 6]
    assert partitions_from_record(record) == _partitions()
    assert partitions_from_record(partitions_record([])) == []


@pytest.mark.parametrize(("record", "message"), [
    (ArrayRecord({"sizes": Array(np.array([[3, 1]]))}), "malformed 'fedimg-partition'"),
    (_record({"sizes": np.array([[3, 1]]), "indices": np.arange(5)}),
     "sizes add up to 4, but it holds 5 indices"),
    (_record({"sizes": np.array([[-1, 1]]), "indices": np.arange(0)}), "sizes add up to 0"),
    (_record({"sizes": np.array([3, 1, 2]), "indices": np.arange(6)}), "malformed"),
    (_record({"sizes": np.array([[1, 1]]), "indices": np.array(["a", "b"])}), "malformed"),
])
def test_a_malformed_partitions_record_is_an_update_error(record, message) -> None:
    with pytest.raises(UpdateError, match=message):
        partitions_from_record(record)
