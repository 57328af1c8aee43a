"""The instrumented Grid: per-client records, byte counts and rejection of bad updates."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from offline_grid import OfflineGrid

from fedimg.transport.grid import InstrumentedGrid
from fedimg.transport.records import metric_record, reply_content
from fedimg.serverapp.validation import UpdateChecks

REFERENCE = {"w": torch.zeros(2, 2)}


class _ScriptedGrid(OfflineGrid):
    """A Grid whose clients answer with pre-written update arrays (node id -> array)."""

    def __init__(self, updates: dict[int, np.ndarray]) -> None:
        self.updates = updates
        self.node_ids = list(updates)

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
    from fedimg.serverapp.discovery import _check_discovery

    info = {0: {"num-train": 10.0}, 1: {"num-train": 12.0}}
    _check_discovery(info, [10, 12], [])  # all present, sizes agree: no error
    with pytest.raises(FedimgError, match=r"clients \[2\] did not start.*DataError"):
        _check_discovery(info, [10, 12, 7], [["DataError: not found"]])
    with pytest.raises(FedimgError, match="client 1 sees 12 training samples but the server"):
        _check_discovery(info, [10, 11], [])


def test_absurd_norms_are_rejected_absolute_and_relative_to_the_round() -> None:
    # Arrange: updates of norm 2, 2, 4 (w - 0 with all-ones*k on 4 entries: norm 2k),
    # one of norm 2e6, and one of norm 20 that breaks only an absolute cap of 10.
    from fedimg.config import FederationConfig

    inner = _ScriptedGrid({1: np.ones((2, 2), np.float32), 2: np.ones((2, 2), np.float32),
                           3: np.full((2, 2), 2.0, np.float32),
                           4: np.full((2, 2), 1e6, np.float32)})
    grid = InstrumentedGrid(inner, reference=REFERENCE, checks=UpdateChecks(
        REFERENCE, fl=FederationConfig(norm_outlier_factor=100.0)))
    grid.node_to_partition = {1: 0, 2: 1, 3: 2, 4: 3}
    # Act
    kept = list(grid.send_and_receive(_train_messages([1, 2, 3, 4])))
    exchanges = {e.partition_id: e for e in grid.drain()}
    # Assert: the median norm is 3 (of 2, 2, 4, 2e6); 2e6 > 100 x 3 is dropped.
    assert [r.metadata.src_node_id for r in kept] == [1, 2, 3]
    assert exchanges[0].update_norm == pytest.approx(2.0)
    assert exchanges[2].update_norm == pytest.approx(4.0)
    assert exchanges[3].status == "rejected" and "median 3" in exchanges[3].reason
    assert dict(grid.rejections) == {3: 1}
    # An absolute cap applies even with a single update in the round.
    capped = InstrumentedGrid(_ScriptedGrid({7: np.full((2, 2), 10.0, np.float32)}),
                              reference=REFERENCE, checks=UpdateChecks(
                                  REFERENCE, fl=FederationConfig(max_update_norm=10.0)))
    assert list(capped.send_and_receive(_train_messages([7]))) == []
    (exchange,) = capped.drain()
    assert "exceeds fl.max_update_norm=10" in exchange.reason


def test_wrong_dtype_is_rejected_but_norms_skip_frozen_keys() -> None:
    # A float64 update for a float32 model is malformed (a client sends its state dict).
    grid = InstrumentedGrid(_ScriptedGrid({1: np.ones((2, 2), np.float64)}),
                            reference=REFERENCE)
    assert list(grid.send_and_receive(_train_messages([1]))) == []
    assert "dtype float64" in grid.drain()[0].reason
    # A frozen key does not count towards the update norm.
    frozen = InstrumentedGrid(_ScriptedGrid({1: np.ones((2, 2), np.float32)}),
                              reference=REFERENCE,
                              checks=UpdateChecks(REFERENCE, fixed_keys=frozenset({"w"})))
    frozen.send_and_receive(_train_messages([1]))
    assert frozen.drain()[0].update_norm == 0.0


def test_restored_ledger_goes_to_its_own_client_once() -> None:
    # Arrange: a resumed server holds client 1's ledger; nodes 10 and 11 are clients 0, 1.
    from fedimg.transport.records import LEDGER_KEY

    seen: dict[int, list[str]] = {}

    class _Recording(_ScriptedGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for m in messages:
                record = m.content.config_records.get(LEDGER_KEY)
                seen.setdefault(m.metadata.dst_node_id, []).append(
                    str(record["json"]) if record is not None else "")
            return super().send_and_receive(messages, timeout=timeout)

    grid = InstrumentedGrid(_Recording({10: np.ones((2, 2), np.float32),
                                        11: np.ones((2, 2), np.float32)}),
                            reference=REFERENCE)
    grid.node_to_partition = {10: 0, 11: 1}
    grid.pending_ledgers = {1: '{"history": []}'}
    # Act: two training rounds
    grid.send_and_receive(_train_messages([10, 11]))
    grid.send_and_receive(_train_messages([10, 11]))
    # Assert: only client 1; until it replies with a ledger, it gets it every time.
    assert seen == {10: ["", ""], 11: ['{"history": []}', '{"history": []}']}
    assert grid.pending_ledgers == {1: '{"history": []}'}


def test_compressed_updates_are_rebuilt_and_bad_ones_rejected() -> None:
    from flwr.app import ConfigRecord

    from fedimg.transport.records import COMPRESSION_KEY

    class _Compressed(_ScriptedGrid):
        codec = "fp16"

        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            for reply in replies:
                w = reply.content["arrays"]["w"].numpy()
                reply.content["arrays"] = ArrayRecord(
                    {"w::h": Array(w.astype(np.float16))})
                reply.content[COMPRESSION_KEY] = ConfigRecord({"codec": self.codec})
            return replies

    inner = _Compressed({1: np.full((2, 2), 0.5, np.float32)})
    grid = InstrumentedGrid(inner, reference=REFERENCE)
    (kept,) = grid.send_and_receive(_train_messages([1]))
    # The strategy sees full float32 weights: global (0) + delta (0.5)
    assert kept.content["arrays"]["w"].numpy().tolist() == [[0.5, 0.5], [0.5, 0.5]]
    (exchange,) = grid.drain()
    assert exchange.bytes_up < exchange.bytes_down  # counted as sent: fp16, not float32
    # An unknown codec is a malformed update: rejected with the valid names.
    inner.codec = "zip"
    assert list(grid.send_and_receive(_train_messages([1]))) == []
    (exchange,) = grid.drain()
    assert exchange.status == "rejected" and "fp16, int8, topk" in exchange.reason
