"""The instrumented Grid: per-client records, byte counts and rejection of bad updates."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedimg.federation.grid import InstrumentedGrid
from fedimg.federation.records import metric_record, reply_content

REFERENCE = {"w": torch.zeros(2, 2)}


class _ScriptedGrid(Grid):
    """A Grid whose clients answer with pre-written update arrays (node id -> array)."""

    def __init__(self, updates: dict[int, np.ndarray]) -> None:
        self.updates = updates

    def set_run(self, run) -> None: ...
    @property
    def run(self): return None
    def create_message(self, *args, **kwargs) -> Message: raise NotImplementedError
    def push_messages(self, messages): return []
    def pull_messages(self, message_ids): return []
    def get_node_ids(self) -> Iterable[int]: return list(self.updates)

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            arrays = ArrayRecord({"w": Array(self.updates[m.metadata.dst_node_id])})
            content = reply_content(metrics=metric_record({"train/loss": 0.5},
                                                          num_examples=4), arrays=arrays)
            reply = Message(content=content, message_type=MessageType.TRAIN,
                            dst_node_id=m.metadata.dst_node_id)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(reply)
        return replies


def _train_messages(nodes: list[int]) -> list[Message]:
    payload = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})})
    return [Message(content=payload, message_type=MessageType.TRAIN, dst_node_id=n)
            for n in nodes]


def test_bad_updates_are_dropped_and_counted() -> None:
    # Arrange: node 11 is fine, 12 sends NaN, 13 sends the wrong shape.
    inner = _ScriptedGrid({11: np.ones((2, 2), np.float32),
                           12: np.full((2, 2), np.nan, np.float32),
                           13: np.ones((3, 2), np.float32)})
    grid = InstrumentedGrid(inner, reference=REFERENCE)
    grid.node_to_partition = {11: 0, 12: 1, 13: 2}
    # Act
    kept = list(grid.send_and_receive(_train_messages([11, 12, 13])))
    exchanges = grid.drain()
    # Assert
    assert [r.metadata.src_node_id for r in kept] == [11]
    status = {e.partition_id: e.status for e in exchanges}
    assert status == {0: "ok", 1: "rejected", 2: "rejected"}
    assert dict(grid.rejections) == {1: 1, 2: 1}
    assert "NaN" in next(e.reason for e in exchanges if e.partition_id == 1)


def test_bytes_are_counted_per_direction() -> None:
    grid = InstrumentedGrid(_ScriptedGrid({5: np.ones((2, 2), np.float32)}),
                            reference=REFERENCE)
    grid.send_and_receive(_train_messages([5]))
    (exchange,) = grid.drain()
    # 4 float32 values each way, plus the .npy header Flower's Array carries.
    assert exchange.bytes_down == exchange.bytes_up >= 16
    assert exchange.metrics == {"train/loss": 0.5} and exchange.num_examples == 4


def test_node_ids_are_ordered_by_partition() -> None:
    grid = InstrumentedGrid(_ScriptedGrid({30: np.ones(1), 10: np.ones(1), 20: np.ones(1)}),
                            reference=REFERENCE)
    grid.node_to_partition = {30: 0, 10: 2, 20: 1}
    assert list(grid.get_node_ids()) == [30, 20, 10]


def test_discovery_refuses_missing_clients_and_mismatched_data() -> None:
    from fedimg.errors import FedimgError
    from fedimg.federation.grid import _check_discovery

    info = {0: {"num-train": 10.0}, 1: {"num-train": 12.0}}
    _check_discovery(info, [10, 12], [])  # all present, sizes agree: no error
    with pytest.raises(FedimgError, match=r"clients \[2\] did not start.*DataError"):
        _check_discovery(info, [10, 12, 7], [["DataError: not found"]])
    with pytest.raises(FedimgError, match="client 1 sees 12 training samples but the server"):
        _check_discovery(info, [10, 11], [])
