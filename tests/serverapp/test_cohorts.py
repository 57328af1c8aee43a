"""Cohorts (sim.cohort_size): training messages merged per node, replies split per client."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from offline_grid import OfflineGrid, Recording, answer, offline_loop, update

from fedimg.config import FedimgConfig, FederationConfig, SimConfig
from fedimg.serverapp.cohorts import group, split
from fedimg.transport.grid import Exchange, Transport
from fedimg.transport.records import (
    ARRAYS_KEY,
    COHORT_KEY,
    cohort_partitions,
    cohort_reply,
)

REFERENCE = {"w": torch.zeros(3)}


def _partition_of(node: int) -> int:
    return node - 1  # node n is client n - 1


def _messages(n: int = 5) -> list[Message]:
    """One training message per node 1..n, all sharing one content (as a strategy makes)."""
    content = RecordDict({ARRAYS_KEY: ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}),
                          "config": ConfigRecord({"server-round": 1})})
    return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            for node in range(n, 0, -1)]  # out of client order on purpose


class _CohortGrid(OfflineGrid):
    """Client p answers w + (p + 1) with 10 (p + 1) examples; a cohort answers per member.

    Nodes in ``failing`` answer with an error (a dead worker: its whole cohort fails).
    """

    def __init__(self, failing: Iterable[int] = ()) -> None:
        self.node_ids, self.failing = [1, 2, 3, 4, 5], set(failing)
        self.received: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:  # noqa: ANN001
        replies = []
        for m in messages:
            self.received.append(m)
            if m.metadata.dst_node_id in self.failing:
                replies.append(answer(m, Error(code=0, reason="worker died")))
                continue
            members = cohort_partitions(m.content)
            own = [update(m.content[ARRAYS_KEY]["w"].numpy() + p + 1, num_examples=10 * (p + 1),
                          **{"train/loss": 0.5})
                   for p in members or [_partition_of(m.metadata.dst_node_id)]]
            replies.append(answer(m, own[0] if members is None else cohort_reply(own)))
        return replies


def test_five_clients_in_cohorts_of_two_are_three_messages_in_client_order():
    # Arrange
    messages = _messages()

    # Act
    grouping = group(messages, 2, partition_of=_partition_of)

    # Assert: clients {0, 1}, {2, 3} and {4}, sent to their first member's node
    sent = grouping.messages
    assert [m.metadata.dst_node_id for m in sent] == [1, 3, 5]
    assert [cohort_partitions(m.content) for m in sent] == [[0, 1], [2, 3], None]
    assert list(sent[0].content[COHORT_KEY]["nodes"]) == ["1", "2"]
    assert sent[2] is messages[0]  # a cohort of one is the strategy's message, untouched
    assert ARRAYS_KEY in sent[0].content and ARRAYS_KEY in sent[1].content


def test_a_message_with_content_of_its_own_is_never_merged():
    # Arrange: client 1's message carries something only it gets (e.g. a DP ledger)
    messages = _messages(3)
    own = RecordDict(dict(messages[1].content.items()))
    own["fedimg-privacy-ledger"] = ConfigRecord({"json": "{}"})
    messages[1] = Message(content=own, message_type=MessageType.TRAIN, dst_node_id=2)

    # Act
    grouping = group(messages, 4, partition_of=_partition_of)

    # Assert: clients 0 and 2 share a message; client 1 goes alone
    assert sorted((cohort_partitions(m.content) or [_partition_of(m.metadata.dst_node_id)])
                  for m in grouping.messages) == [[0, 2], [1]]


def test_size_one_changes_nothing():
    messages = _messages()
    grouping = group(messages, 1, partition_of=_partition_of)
    exchanges = [Exchange(phase=MessageType.TRAIN, partition_id=0, node_id=1, sent=m,
                          bytes_down=12) for m in messages]
    assert grouping.messages == messages
    assert split(exchanges, grouping) is exchanges


def test_split_gives_each_member_its_own_reply_and_bytes():
    # Arrange: node 3 (the cohort of clients 2 and 3) dies
    transport = Transport(_CohortGrid(failing={3}))
    transport.node_to_partition = {n: _partition_of(n) for n in range(1, 6)}
    grouping = group(_messages(), 2, partition_of=_partition_of)

    # Act
    exchanges = split(transport.exchange(grouping.messages, timeout=5), grouping)

    # Assert: one exchange per client, in client order, from its own node
    assert [(e.partition_id, e.node_id) for e in exchanges] == [(p, p + 1) for p in range(5)]
    ok = [e for e in exchanges if not e.reply.has_error()]
    assert [e.partition_id for e in ok] == [0, 1, 4]
    for e in ok:  # a lone client's reply: w + (p + 1), 10 (p + 1) examples
        assert set(e.reply.content.keys()) == {"arrays", "metrics"}
        assert e.reply.metadata.src_node_id == e.node_id
        np.testing.assert_array_equal(e.reply.content[ARRAYS_KEY]["w"].numpy(),
                                      np.full(3, e.partition_id + 1.0))
        assert e.reply.content["metrics"]["num-examples"] == 10 * (e.partition_id + 1)
    failed = [e for e in exchanges if e.reply.has_error()]
    assert [e.partition_id for e in failed] == [2, 3]
    assert all(e.reply.error.reason == "worker died" for e in failed)
    # the model (140 bytes: 3 float32 after numpy's 128-byte header) went down once per
    # cohort: 70 + 70 for a pair, 140 alone; each update (140 bytes) came up, nothing
    # from the failed pair
    assert [e.bytes_down for e in exchanges] == [70, 70, 70, 70, 140]
    assert [e.bytes_up for e in exchanges] == [140, 140, 0, 0, 140]


def test_an_odd_byte_count_is_shared_with_the_remainder_first():
    grouping = group(_messages(3)[1:], 2, partition_of=_partition_of)  # clients 0 and 1
    cohort = Exchange(phase=MessageType.TRAIN, partition_id=0, node_id=1,
                      sent=grouping.messages[0], bytes_down=13)
    assert [e.bytes_down for e in split([cohort], grouping)] == [7, 6]  # 13 = 7 + 6
    assert all(e.reply is None for e in split([cohort], grouping))  # no reply: none each


def _run(cohort_size: int, failing: Iterable[int] = ()) -> tuple[float, Recording]:
    cfg = FedimgConfig(rounds=1, clients=5, sim=SimConfig(cohort_size=cohort_size),
                       fl=FederationConfig(min_train_clients=5, min_evaluate_clients=0,
                                           fraction_evaluate=0.0))
    recording = Recording()
    loop = offline_loop(cfg, _CohortGrid(failing), reference=REFERENCE,
                        callbacks=[recording])
    loop.run()
    return float(loop.state.arrays["w"].numpy()[0]), recording


@pytest.mark.parametrize("cohort_size", [1, 2, 4])
def test_fedavg_of_cohort_members_is_that_of_lone_clients(cohort_size):
    # Act
    w, recording = _run(cohort_size)

    # Assert: sum (p+1) x 10 (p+1) / sum 10 (p+1) = (1 + 4 + 9 + 16 + 25) / 15 = 55 / 15
    assert w == pytest.approx(55 / 15)
    assert [e.status for e in recording.results[-1].exchanges] == ["ok"] * 5


def test_a_failed_cohort_fails_each_member_and_the_rest_aggregate():
    # Act: node 3 carries clients 2 and 3
    w, recording = _run(2, failing={3})

    # Assert: (1 + 4 + 25) / (1 + 2 + 5) = 30 / 8
    assert w == pytest.approx(30 / 8)
    exchanges = recording.results[-1].exchanges
    assert [(e.partition_id, e.status) for e in exchanges] == [
        (0, "ok"), (1, "ok"), (2, "failed"), (3, "failed"), (4, "ok")]
    assert exchanges[2].reason == exchanges[3].reason == "worker died"


class _HostileCohortGrid(_CohortGrid):
    """Node 1 (clients 0 and 1) answers a forged cohort reply: client 1's records are
    missing, and junk, a nameless member record and a bogus member error ride along."""

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:  # noqa: ANN001
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for i, m in enumerate(messages):
            if m.metadata.dst_node_id == 1 and cohort_partitions(m.content):
                forged = cohort_reply([update(np.ones(3, np.float32), num_examples=10)])
                forged["junk"] = ConfigRecord({"x": "y"})
                forged[f"{COHORT_KEY}-7-error"] = ConfigRecord({"code": "not an int"})
                forged[f"{COHORT_KEY}-0-"] = ConfigRecord({})  # a member key with no name
                replies[i] = answer(m, forged)
        return replies


def test_a_forged_cohort_reply_rejects_its_bad_member_and_the_round_goes_on():
    # Arrange: cohorts {0, 1}, {2, 3}, {4}; node 1 forges its cohort's reply
    cfg = FedimgConfig(rounds=1, clients=5, sim=SimConfig(cohort_size=2),
                       fl=FederationConfig(min_train_clients=5, min_evaluate_clients=0,
                                           fraction_evaluate=0.0))
    recording = Recording()
    loop = offline_loop(cfg, _HostileCohortGrid(), reference=REFERENCE, callbacks=[recording])
    # Act
    loop.run()
    # Assert: client 0's reply picked up the nameless record (an unknown record name) and
    # client 1 has none: both rejected, never a crash; clients 2, 3, 4 (w + 3, + 4, + 5
    # with 30, 40, 50 examples) aggregate: (3 x 30 + 4 x 40 + 5 x 50) / 120 = 500 / 120
    exchanges = recording.results[-1].exchanges
    assert [e.status for e in exchanges] == ["rejected", "rejected", "ok", "ok", "ok"]
    assert "reply carries records []" in exchanges[1].reason
    assert float(loop.state.arrays["w"].numpy()[0]) == pytest.approx(500 / 120)
