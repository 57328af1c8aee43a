"""The transport: exchanges in client order, bytes each way, deadlines, the address book."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from offline_grid import OfflineGrid, answer, fedavg, update

from fedimg.transport.grid import NodeView, Transport, content_bytes, error_summary
from fedimg.transport.records import PARTITION_KEY, record_bytes


class _ScriptedGrid(OfflineGrid):
    """Nodes that answer with all-ones updates of 4 examples, in reverse order; ``silent``
    nodes never answer, ``failing`` ones answer with an error."""

    def __init__(self, nodes: Iterable[int], *, silent: frozenset[int] = frozenset(),
                 failing: frozenset[int] = frozenset()) -> None:
        self.node_ids, self.silent, self.failing = list(nodes), silent, failing

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in reversed(list(messages)):  # completion order is not client order
            node = m.metadata.dst_node_id
            if node in self.failing:
                replies.append(answer(m, Error(code=0, reason="worker died")))
            elif node not in self.silent:
                replies.append(answer(m, update(np.ones((2, 2), np.float32), num_examples=4,
                                                **{"train/loss": 0.5})))
        return replies


def _train_messages(nodes: Iterable[int]) -> list[Message]:
    payload = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})})
    return [Message(content=payload, message_type=MessageType.TRAIN, dst_node_id=n)
            for n in nodes]


def test_exchanges_come_back_in_client_order_with_bytes_each_way() -> None:
    # Arrange: nodes 30, 10, 20 are clients 0, 2, 1
    transport = Transport(_ScriptedGrid([30, 10, 20]))
    transport.node_to_partition = {30: 0, 10: 2, 20: 1}
    # Act
    exchanges = transport.exchange(_train_messages([10, 20, 30]), timeout=5)
    # Assert: client order, whatever order the replies came in
    assert [(e.partition_id, e.node_id) for e in exchanges] == [(0, 30), (1, 20), (2, 10)]
    # 4 float32 values each way, plus the .npy header Flower's Array carries.
    assert all(e.bytes_down == e.bytes_up >= 16 for e in exchanges)
    assert all(e.phase == MessageType.TRAIN and e.status == "ok" for e in exchanges)
    # What a reply means is the filters' job: nothing is decoded yet.
    assert exchanges[0].metrics == {} and exchanges[0].arrays is None


def test_an_error_reply_counts_no_bytes_up() -> None:
    transport = Transport(_ScriptedGrid([1], failing=frozenset({1})))
    (exchange,) = transport.exchange(_train_messages([1]), timeout=5)
    assert exchange.reply.has_error() and exchange.bytes_up == 0 and exchange.bytes_down > 0


def test_a_client_that_never_replies_leaves_an_empty_exchange_at_the_deadline() -> None:
    # Arrange: node 2 never answers; the deadline is 0.3 s
    transport = Transport(_ScriptedGrid([1, 2], silent=frozenset({2})))
    transport.node_to_partition = {1: 0, 2: 1}
    started = time.monotonic()
    # Act
    first, second = transport.exchange(_train_messages([1, 2]), timeout=0.3)
    # Assert
    assert time.monotonic() - started < 3
    assert first.reply is not None and second.reply is None and second.bytes_up == 0
    assert not second.usable


def test_node_ids_are_ordered_by_partition() -> None:
    transport = Transport(_ScriptedGrid([30, 10, 20]))
    transport.node_to_partition = {30: 0, 10: 2, 20: 1}
    assert transport.node_ids() == [30, 20, 10]
    assert transport.partition_of(20) == 1 and transport.partition_of(99) == -1


def test_before_discovery_every_node_takes_part_after_it_only_those_found() -> None:
    grid = _ScriptedGrid([5, 3])
    transport = Transport(grid)
    assert transport.node_ids() == [3, 5]  # no address book yet: by node id
    transport.node_to_partition = {5: 0, 3: 1}
    grid.node_ids.append(99)  # connects after discovery: it has no size to be held to
    assert transport.node_ids() == [5, 3]


def test_content_bytes_leave_out_the_simulated_partitions() -> None:
    # Arrange: 4 float32 weights and a partition record of 100 int64 indices
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    content = RecordDict({"arrays": arrays,
                          PARTITION_KEY: ArrayRecord({"indices": Array(np.arange(100))})})
    # Act / Assert: a real client holds its own data, so only the model counts
    assert content_bytes(content) == record_bytes(arrays) == len(arrays["w"].data)
    assert 16 < content_bytes(content) < 8 * 100  # 16 bytes of values + the .npy header


def test_error_summary_keeps_the_line_that_names_the_exception() -> None:
    reason = ("Traceback (most recent call last):\n  File \"app.py\", line 3\n\n"
              "\x1b[31mRuntimeError: CUDA out of memory'>\x1b[0m\n")
    assert error_summary(reason) == "RuntimeError: CUDA out of memory"
    assert error_summary("x" * 500, limit=10) == "x" * 10
    assert error_summary("") == ""


def test_a_strategy_shown_a_node_view_configures_exactly_those_nodes() -> None:
    # Arrange: fedimg's FedAvg (fraction 1) and the two nodes the loop sampled
    view = NodeView([4, 9])
    # Act
    messages = list(fedavg().configure_train(1, ArrayRecord(), ConfigRecord(), view))
    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [4, 9]
    with pytest.raises(NotImplementedError, match="strategies do not send"):
        view.push_messages(messages)
