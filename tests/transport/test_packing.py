"""Packed transport: one buffer per message, bit-identical arrays, malformed packs refused."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from offline_grid import OfflineGrid, answer, fedavg

from fedimg.config import HeterogeneityConfig
from fedimg.errors import UpdateError
from fedimg.serverapp.filters import FilterContext, apply_filters
from fedimg.serverapp.state import RunState, Sampler
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.grid import Exchange, Transport
from fedimg.transport.packing import (
    LAYOUT_KEY,
    PACKED_ARRAYS_KEY,
    pack_arrays,
    pack_content,
    unpack_arrays,
    unpack_content,
)
from fedimg.transport.records import metric_record, reply_content

ARRAYS = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
          "bn.num_batches_tracked": np.array(7, dtype=np.int64),  # 0-d
          "head.bias": np.array([0.1, -2.5], dtype=np.float64),
          "empty": np.zeros((0, 3), dtype=np.float32)}


def test_round_trip_is_bit_identical_with_dtypes_and_shapes() -> None:
    # Arrange
    record = ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})
    # Act
    packed, layout = pack_arrays(record)
    restored = unpack_arrays(packed, layout)
    # Assert: one buffer of 96 + 8 + 16 + 0 bytes, and every array exactly back.
    assert list(packed) == ["bytes"] and packed["bytes"].numpy().nbytes == 120
    for key, original in ARRAYS.items():
        got = restored[key].numpy()
        assert got.dtype == original.dtype and got.shape == original.shape
        assert np.array_equal(got, original)


def test_content_keeps_other_records_and_is_unchanged_without_arrays() -> None:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(ARRAYS["head.bias"])}),
                          "config": ConfigRecord({"server-round": 3})})
    packed = pack_content(content, "arrays")
    assert set(packed.keys()) == {"config", PACKED_ARRAYS_KEY, LAYOUT_KEY}
    back = unpack_content(packed)
    assert set(back.keys()) == {"config", "arrays"} and back["config"]["server-round"] == 3
    no_arrays = RecordDict({"config": ConfigRecord({"a": 1})})
    assert pack_content(no_arrays, "arrays") is no_arrays
    assert unpack_content(no_arrays) is no_arrays


@pytest.mark.parametrize("layout, message", [
    ([["w", "<f4", [4]]], "overruns"),  # 16 bytes asked of an 8-byte buffer
    ([["w", "<f4", [1]]], "holds 8 bytes, its layout 4"),  # bytes left over
    ([["w", "<f4"]], "malformed"),  # no shape
    ([["w", "zz", [2]]], "malformed"),  # not a dtype
    ([["w", "|O", [1]]], "numeric dtype"),  # objects are never model arrays
    ([["w", "<f4", [-2]]], "non-negative"),
])
def test_a_layout_that_does_not_fit_its_buffer_is_refused(layout, message) -> None:
    packed = ArrayRecord({"bytes": Array(np.zeros(8, dtype=np.uint8))})
    with pytest.raises(UpdateError, match=message):
        unpack_arrays(packed, layout)


class _PackingClients(OfflineGrid):
    """Clients that answer the way fedimg's ClientApp does: packed if the message was."""

    def __init__(self, update: np.ndarray, *, corrupt: bool = False) -> None:
        self.update, self.corrupt = update, corrupt
        self.received: list[list[str]] = []
        self.contents: set[int] = set()  # the distinct contents that went on the wire
        self.node_ids = [1, 2]

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            self.received.append(sorted(m.content.keys()))
            self.contents.add(id(m.content))
            content = reply_content(metrics=metric_record({}, num_examples=4),
                                    arrays=ArrayRecord({"w": Array(self.update)}))
            content = pack_content(content, "arrays")
            if self.corrupt:
                content[LAYOUT_KEY] = ConfigRecord({"record": "arrays",
                                                    "json": json.dumps([["w", "<f4", [9]]])})
            replies.append(answer(m, content))
        return replies


def _messages() -> list[Message]:
    shared = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})})
    return [Message(content=shared, message_type=MessageType.TRAIN, dst_node_id=n)
            for n in (1, 2)]


def _exchange(inner: _PackingClients) -> list[Exchange]:
    """One packed training exchange with clients 0 and 1, through the reply filters."""
    transport = Transport(inner, pack=True)
    transport.node_to_partition = {1: 0, 2: 1}
    exchanges = transport.exchange(_messages(), timeout=5)
    state = RunState(arrays=ArrayRecord(), strategy=fedavg(), sampler=Sampler(0))
    apply_filters(exchanges, FilterContext(checks=UpdateChecks({"w": torch.zeros(2, 2)}),
                                           state=state, hetero=HeterogeneityConfig()))
    return exchanges


def test_transport_sends_packed_and_the_strategy_gets_plain_arrays() -> None:
    # Arrange
    inner = _PackingClients(np.full((2, 2), 0.25, np.float32))
    # Act
    exchanges = _exchange(inner)
    # Assert: the wire carried one buffer, packed once for the content both messages
    # share; the strategy gets the update as sent, the filters the global model as sent.
    assert inner.received == [sorted([PACKED_ARRAYS_KEY, LAYOUT_KEY])] * 2
    assert len(inner.contents) == 1
    assert [e.reply.content["arrays"]["w"].numpy().tolist() for e in exchanges] == \
        [[[0.25] * 2] * 2] * 2
    assert all(e.status == "ok" and e.bytes_up > 16 for e in exchanges)
    assert all("arrays" in e.sent.content.array_records for e in exchanges)
    assert [e.update_norm for e in exchanges] == [pytest.approx(0.5)] * 2  # sqrt(4 x 0.25^2)


def test_a_malformed_packed_reply_is_rejected_not_aggregated() -> None:
    exchanges = _exchange(_PackingClients(np.ones((2, 2), np.float32), corrupt=True))
    assert {e.status for e in exchanges} == {"rejected"}
    assert "overruns" in exchanges[0].reason
