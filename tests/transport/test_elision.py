"""Frozen arrays stay home: what the server leaves out, and what a client puts back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from offline_grid import OfflineGrid, answer, update

from fedimg.errors import UpdateError
from fedimg.transport.elision import ELIDED_KEY, Elision, digest, elided_keys, restore
from fedimg.transport.grid import Transport, content_bytes
from fedimg.transport.packing import unpack_content
from fedimg.transport.records import ARRAYS_KEY

TRUNK = np.arange(6, dtype=np.float32).reshape(2, 3)  # frozen, as every client built it
STATS = np.array([0.5, 2.0], dtype=np.float32)  # frozen BatchNorm statistics
HEAD = np.ones(3, dtype=np.float32)  # frozen too, but the server changed it (ridge head)
TAIL = np.full(4, 7.0, dtype=np.float32)  # trained


def _elision() -> Elision:
    return Elision({"trunk": TRUNK, "bn.running_var": STATS, "head": np.zeros(3, np.float32)})


def _content() -> RecordDict:
    return RecordDict({ARRAYS_KEY: ArrayRecord({
        "trunk": Array(TRUNK), "bn.running_var": Array(STATS), "head": Array(HEAD),
        "tail": Array(TAIL)}), "config": ConfigRecord({"round": 1})})


def test_digest_covers_keys_dtypes_shapes_and_bytes() -> None:
    # Arrange: the digest by hand, for one array
    by_hand = hashlib.sha256(b"a|<f4|(2, 3)|" + TRUNK.tobytes()).hexdigest()
    # Act / Assert
    assert digest({"a": TRUNK}) == by_hand
    assert digest({"a": TRUNK, "b": STATS}) == digest({"b": STATS, "a": TRUNK})  # key order
    assert digest({"a": TRUNK}) != digest({"a": TRUNK.reshape(3, 2)})
    assert digest({"a": TRUNK}) != digest({"a": TRUNK.astype(np.float64)})
    assert digest({"a": TRUNK}) != digest({"b": TRUNK})


def test_the_server_leaves_out_frozen_arrays_that_equal_the_initial_model() -> None:
    # Act
    wire = _elision().elide(_content())
    # Assert: the trunk and the statistics stay home; the changed head and the tail travel
    assert sorted(wire[ARRAYS_KEY].keys()) == ["head", "tail"]
    keys, sent_digest = elided_keys(wire)
    assert keys == ("bn.running_var", "trunk")
    assert sent_digest == digest({"trunk": TRUNK, "bn.running_var": STATS})
    assert wire["config"]["round"] == 1
    # the strategy's content is untouched: the round loop keeps reading it
    assert sorted(_content()[ARRAYS_KEY].keys()) == ["bn.running_var", "head", "tail", "trunk"]


def test_nothing_is_left_out_when_no_frozen_array_is_as_built() -> None:
    content = RecordDict({ARRAYS_KEY: ArrayRecord({"trunk": Array(TRUNK + 1)})})
    assert _elision().elide(content) is content


def test_a_client_puts_its_own_frozen_arrays_back_to_the_bit() -> None:
    # Arrange: the client built the same trunk and statistics
    wire = _elision().elide(_content())
    own = {"trunk": TRUNK.copy(), "bn.running_var": STATS.copy()}
    # Act
    arrays = restore(wire, lambda keys: [{k: own[k] for k in keys}],
                     allowed=frozenset({"trunk", "bn.running_var", "head"}))
    # Assert
    assert arrays is not None and sorted(arrays) == ["bn.running_var", "head", "tail", "trunk"]
    for key, value in {"trunk": TRUNK, "bn.running_var": STATS, "head": HEAD,
                       "tail": TAIL}.items():
        assert arrays[key].dtype == value.dtype and np.array_equal(arrays[key], value)


def test_a_client_with_other_pretrained_weights_rejects_the_message() -> None:
    wire = _elision().elide(_content())
    own = {"trunk": TRUNK + 1e-3, "bn.running_var": STATS}
    with pytest.raises(UpdateError, match=r"digest .* fl.elide_frozen=false"):
        restore(wire, lambda keys: [{k: own[k] for k in keys}],
                allowed=frozenset({"trunk", "bn.running_var"}))


def test_a_client_never_fills_in_an_array_it_trains() -> None:
    # A hostile server leaves out the tail, which this client trains
    wire = _elision().elide(_content())
    with pytest.raises(UpdateError, match="which this client trains"):
        restore(wire, lambda keys: [], allowed=frozenset({"trunk"}))


@pytest.mark.parametrize("note, match", [
    ({"keys": "not json", "digest": "0"}, "malformed"),
    ({"keys": json.dumps(["trunk", "trunk"]), "digest": "0"}, "distinct"),
    ({"keys": json.dumps({"trunk": 1}), "digest": "0"}, "distinct"),
    ({"keys": json.dumps(["tail"]), "digest": "0"}, "both carries"),
    ({"keys": json.dumps(["trunk"])}, "malformed"),
])
def test_a_malformed_note_is_a_rejected_message(note, match) -> None:  # noqa: ANN001
    content = _content()
    content[ELIDED_KEY] = ConfigRecord(note)
    with pytest.raises(UpdateError, match=match):
        restore(content, lambda keys: [{k: TAIL for k in keys}],
                allowed=frozenset({"trunk", "tail"}))


def test_a_note_without_a_model_is_a_rejected_message() -> None:
    content = RecordDict({ELIDED_KEY: ConfigRecord({"keys": json.dumps(["trunk"]),
                                                    "digest": "0"})})
    with pytest.raises(UpdateError, match="carries no model"):
        restore(content, lambda keys: [], allowed=frozenset({"trunk"}))


def test_a_message_that_left_nothing_out_is_read_as_it_is() -> None:
    arrays = restore(_content(), lambda keys: [], allowed=frozenset())
    assert arrays is not None and np.array_equal(arrays["trunk"], TRUNK)
    assert restore(RecordDict(), lambda keys: [], allowed=frozenset()) is None


class _EchoGrid(OfflineGrid):
    """One node that keeps what it received and answers with a small update."""

    def __init__(self) -> None:
        self.node_ids, self.received = [1], []

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:  # noqa: ANN001
        self.received = list(messages)
        return [answer(m, update(TAIL, num_examples=4)) for m in messages]


@pytest.mark.parametrize("pack", [False, True])
def test_the_transport_sends_less_and_keeps_what_the_strategy_made(pack: bool) -> None:
    # Arrange
    grid = _EchoGrid()
    transport = Transport(grid, pack=pack, elision=_elision())
    message = Message(content=_content(), message_type=MessageType.TRAIN, dst_node_id=1)
    # Act
    (exchange,) = transport.exchange([message], timeout=5)
    # Assert: on the wire the head and the tail (and the note); in the exchange all four
    wire = unpack_content(grid.received[0].content)
    assert sorted(wire[ARRAYS_KEY].keys()) == ["head", "tail"]
    assert exchange.sent is message and len(exchange.sent.content[ARRAYS_KEY].keys()) == 4
    header = 128  # the .npy header of each Array Flower sends
    assert exchange.bytes_down <= HEAD.nbytes + TAIL.nbytes + 2 * header
    assert exchange.bytes_down < content_bytes(_content())
