"""Reply filters: each one on a crafted exchange, the chain over a transport, hostile replies."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from offline_grid import OfflineGrid, Recording, answer, fedavg, offline_loop, update

from fedimg.config import FedimgConfig, FederationConfig, HeterogeneityConfig
from fedimg.errors import UpdateError
from fedimg.serverapp import filters
from fedimg.serverapp.filters import FilterContext, SetAside, apply_filters
from fedimg.serverapp.round_record import pooled_validation
from fedimg.serverapp.state import RunState, Sampler
from fedimg.serverapp.validation import UpdateChecks
from fedimg.simulation import fleet
from fedimg.transport.grid import Exchange, Transport
from fedimg.transport.packing import LAYOUT_KEY, pack_content
from fedimg.transport.records import (
    COMPRESSION_KEY,
    DECLINED_KEY,
    LEDGER_KEY,
    METRICS_KEY,
    metric_record,
    reply_content,
)

REFERENCE = {"w": torch.zeros(2, 2)}
ZEROS = np.zeros((2, 2), np.float32)


def _sent(phase: str = MessageType.TRAIN, node: int = 1, model: bool = True) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(ZEROS)})} if model else {})
    return Message(content=content, message_type=phase, dst_node_id=node)


def _exchange(content: RecordDict | Error | None, *, phase: str = MessageType.TRAIN,
              model: bool = True) -> Exchange:
    """Client 0's exchange: what it was sent (the zero model) and ``content`` back."""
    sent = _sent(phase, model=model)
    return Exchange(phase=phase, partition_id=0, node_id=1, sent=sent, bytes_down=0,
                    reply=None if content is None else answer(sent, content))


def _ctx(checks: UpdateChecks | None = None, **hetero) -> FilterContext:
    state = RunState(arrays=ArrayRecord(), strategy=fedavg(), sampler=Sampler(0))
    return FilterContext(checks=checks or UpdateChecks(REFERENCE), state=state,
                         hetero=HeterogeneityConfig(**hetero))


def _aside(step: Callable, e: Exchange, ctx: FilterContext) -> tuple[str, str]:
    with pytest.raises(SetAside) as aside:
        step(e, ctx)
    return aside.value.status, aside.value.reason


# -- one filter at a time ------------------------------------------------------------------

def test_missing_reply_is_a_timeout_or_what_the_deadline_calls_it() -> None:
    assert _aside(filters.missing_reply, _exchange(None), _ctx())[0] == "timeout"
    ctx = _ctx()
    ctx.late = ("straggler", "no reply before the hetero.deadline_s=0.5s deadline")
    assert _aside(filters.missing_reply, _exchange(None), ctx) == ctx.late


def test_an_error_is_a_failure_and_a_simulated_absence_its_own_status() -> None:
    crash = Error(code=0, reason="Traceback (most recent call last):\n  ...\n"
                                 "RuntimeError: CUDA out of memory")
    absent = Error(code=fleet.ABSENT_CODE, reason=str(fleet.ClientOffline("not online")))
    assert _aside(filters.error_reply, _exchange(crash), _ctx()) == (
        "failed", "RuntimeError: CUDA out of memory")
    assert _aside(filters.error_reply, _exchange(absent), _ctx()) == (
        "offline", "[offline] not online")


def test_unpack_and_read_metrics_fill_the_exchange() -> None:
    # Arrange: a packed reply with loss 0.25 over 4 examples
    e = _exchange(pack_content(update(np.ones((2, 2), np.float32), num_examples=4,
                                      **{"train/loss": 0.25}), "arrays"))
    # Act
    filters.unpack(e, _ctx())
    filters.read_metrics(e, _ctx())
    # Assert
    assert e.reply.content["arrays"]["w"].numpy().tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert (e.metrics, e.num_examples) == ({"train/loss": 0.25}, 4)


def test_a_reported_ledger_goes_to_the_run_state_and_to_disk(tmp_path) -> None:
    content = update(ZEROS, num_examples=4)
    content[LEDGER_KEY] = ConfigRecord({"json": '{"history": [[1.0, 0.1, 2]]}'})
    ctx = _ctx()
    ctx.state.ledgers_to_return, ctx.ledger_path = {0}, tmp_path / "ledgers.json"
    filters.keep_ledger(_exchange(content), ctx)
    assert ctx.state.ledgers == {0: '{"history": [[1.0, 0.1, 2]]}'}
    assert ctx.state.ledgers_to_return == set()  # the client holds it again
    assert json.loads(ctx.ledger_path.read_text()) == {"0": '{"history": [[1.0, 0.1, 2]]}'}


def test_declined_and_straggler_are_set_aside_with_their_reason() -> None:
    content = update(ZEROS, num_examples=4)
    content[DECLINED_KEY] = ConfigRecord({"reason": "epsilon 8.0 spent"})
    assert _aside(filters.declined, _exchange(content), _ctx()) == ("declined",
                                                                    "epsilon 8.0 spent")
    # 3 s of simulated device time against a 2 s deadline: late, in training only.
    late = _exchange(update(ZEROS, num_examples=4, **{"fleet/device_s": 3.0}))
    filters.read_metrics(late, _ctx())
    status, reason = _aside(filters.straggler, late, _ctx(deadline_s=2.0))
    assert status == "straggler" and "3.00s" in reason and "deadline_s=2.0" in reason
    late.phase = MessageType.EVALUATE
    filters.straggler(late, _ctx(deadline_s=2.0))  # an evaluation is never late


def test_decompress_rebuilds_the_update_from_the_global_model() -> None:
    # Arrange: an fp16 delta of 0.5 from the zero model
    content = reply_content(metrics=metric_record({}, num_examples=4), arrays=ArrayRecord(
        {"w::h": Array(np.full((2, 2), 0.5, np.float16))}))
    content[COMPRESSION_KEY] = ConfigRecord({"codec": "fp16"})
    e = _exchange(content)
    # Act
    filters.decompress(e, _ctx())
    # Assert: full float32 weights, for the checks and in the reply the strategy reads
    assert e.arrays["w"].dtype == np.float32 and e.arrays["w"].tolist() == [[0.5] * 2] * 2
    assert list(e.reply.content["arrays"].keys()) == ["w"]
    with pytest.raises(UpdateError, match="message that carried no model"):
        filters.decompress(_exchange(content, model=False), _ctx())


@pytest.mark.parametrize("compressed", [False, True])
def test_frozen_arrays_left_out_of_a_reply_are_the_ones_sent(compressed: bool) -> None:
    # Arrange: "f" is frozen and stays home; "w" is trained (ones; as an fp16 delta of 1
    # from the zero model when compressed)
    sent = Message(content=RecordDict({"arrays": ArrayRecord(
        {"f": Array(np.full(3, 2.0, np.float32)), "w": Array(ZEROS)})}),
        message_type=MessageType.TRAIN, dst_node_id=1)
    content = update(np.ones((2, 2), np.float32), num_examples=4)
    if compressed:
        content = reply_content(metrics=metric_record({}, num_examples=4), arrays=ArrayRecord(
            {"w::h": Array(np.ones((2, 2), np.float16))}))
        content[COMPRESSION_KEY] = ConfigRecord({"codec": "fp16"})
    reply = answer(sent, content)
    e = Exchange(phase=MessageType.TRAIN, partition_id=0, node_id=1, sent=sent,
                 bytes_down=0, reply=reply)
    checks = UpdateChecks({"f": torch.zeros(3), "w": torch.zeros(2, 2)},
                          fixed_keys=frozenset({"f"}), immutable_keys=frozenset({"f"}))
    # Act
    apply_filters([e], _ctx(checks))
    # Assert: usable, "f" back as sent (for the checks and the strategy), the norm of "w"
    assert e.status == "ok" and e.arrays["f"].tolist() == [2.0] * 3
    assert list(e.reply.content["arrays"].keys()) == ["f", "w"]
    assert e.reply.content["arrays"]["f"].data is sent.content["arrays"]["f"].data  # no copy
    assert e.update_norm == pytest.approx(2.0)


def test_a_reply_may_not_leave_out_an_array_it_trains() -> None:
    # "w" is trained: a reply without it is malformed, not filled in
    e = _exchange(reply_content(metrics=metric_record({}, num_examples=4),
                                arrays=ArrayRecord({})))
    apply_filters([e], _ctx())
    assert e.status == "rejected" and "missing" in e.reason


def test_check_update_measures_the_norm_of_the_change() -> None:
    # ones(2, 2) - zeros: sqrt(4 x 1) = 2
    e = _exchange(update(np.ones((2, 2), np.float32), num_examples=4))
    filters.read_metrics(e, _ctx())
    filters.decompress(e, _ctx())
    filters.check_update(e, _ctx())
    assert e.update_norm == pytest.approx(2.0)


def test_the_first_filter_that_sets_a_reply_aside_ends_its_chain() -> None:
    # A declined reply carrying NaN weights is declined, not rejected (nor counted).
    content = update(np.full((2, 2), np.nan, np.float32), num_examples=4)
    content[DECLINED_KEY] = ConfigRecord({"reason": "spent"})
    e, ctx = _exchange(content), _ctx()
    apply_filters([e], ctx)
    assert (e.status, e.reason) == ("declined", "spent") and not ctx.state.rejections


# -- the chain over a transport (ported from the instrumented grid) ------------------------

class _ScriptedGrid(OfflineGrid):
    """Clients that answer training messages with pre-written arrays (node id -> array)."""

    def __init__(self, updates: dict[int, np.ndarray],
                 change: Callable[[RecordDict], None] | None = None) -> None:
        self.updates, self.change, self.node_ids = updates, change, list(updates)

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            content = update(self.updates[m.metadata.dst_node_id], num_examples=4,
                             **{"train/loss": 0.5})
            if self.change is not None:
                self.change(content)
            replies.append(answer(m, content))
        return replies


def _round(updates: dict[int, np.ndarray], checks: UpdateChecks | None = None,
           change: Callable[[RecordDict], None] | None = None
           ) -> tuple[dict[int, Exchange], FilterContext]:
    """One training exchange with nodes 1..n as clients 0..n-1, filtered."""
    transport = Transport(_ScriptedGrid(updates, change))
    transport.node_to_partition = {n: i for i, n in enumerate(updates)}
    exchanges = transport.exchange([_sent(node=n) for n in updates], timeout=5)
    ctx = _ctx(checks)
    apply_filters(exchanges, ctx)
    return {e.partition_id: e for e in exchanges}, ctx


def test_bad_updates_are_dropped_and_counted() -> None:
    # Arrange: client 0 is fine, 1 sends NaN, 2 the wrong shape.
    # Act
    got, ctx = _round({11: np.ones((2, 2), np.float32), 12: np.full((2, 2), np.nan, np.float32),
                       13: np.ones((3, 2), np.float32)})
    # Assert
    assert {p: e.status for p, e in got.items()} == {0: "ok", 1: "rejected", 2: "rejected"}
    assert [p for p, e in got.items() if e.usable] == [0]
    assert dict(ctx.state.rejections) == {1: 1, 2: 1}
    assert "NaN" in got[1].reason and "shape (3, 2)" in got[2].reason


def test_absurd_norms_are_rejected_absolute_and_relative_to_the_round() -> None:
    # Arrange: norms 2, 2, 4 (all-k on 4 entries: 2k) and 2e6; factor 100.
    got, ctx = _round({1: np.ones((2, 2), np.float32), 2: np.ones((2, 2), np.float32),
                       3: np.full((2, 2), 2.0, np.float32),
                       4: np.full((2, 2), 1e6, np.float32)},
                      UpdateChecks(REFERENCE, fl=FederationConfig(norm_outlier_factor=100.0)))
    # Assert: the median of 2, 2, 4, 2e6 is 3; 2e6 > 100 x 3 is dropped.
    assert [p for p, e in got.items() if e.usable] == [0, 1, 2]
    assert got[0].update_norm == pytest.approx(2.0) and got[2].update_norm == pytest.approx(4.0)
    assert got[3].status == "rejected" and "median 3" in got[3].reason
    assert dict(ctx.state.rejections) == {3: 1}
    # An absolute cap applies even to a single update in the round: norm 20 > 10.
    capped, _ = _round({7: np.full((2, 2), 10.0, np.float32)},
                       UpdateChecks(REFERENCE, fl=FederationConfig(max_update_norm=10.0)))
    assert "exceeds fl.max_update_norm=10" in capped[0].reason


def test_wrong_dtype_is_rejected_but_norms_skip_frozen_keys() -> None:
    # A float64 update for a float32 model is malformed (a client sends its state dict).
    got, _ = _round({1: np.ones((2, 2), np.float64)})
    assert got[0].status == "rejected" and "dtype float64" in got[0].reason
    # A fixed key does not count towards the update norm.
    got, _ = _round({1: np.ones((2, 2), np.float32)},
                    UpdateChecks(REFERENCE, fixed_keys=frozenset({"w"})))
    assert got[0].usable and got[0].update_norm == 0.0


def test_compressed_updates_are_rebuilt_and_bad_ones_rejected() -> None:
    codec = {"name": "fp16"}

    def to_fp16(content: RecordDict) -> None:
        w = content["arrays"]["w"].numpy()
        content["arrays"] = ArrayRecord({"w::h": Array(w.astype(np.float16))})
        content[COMPRESSION_KEY] = ConfigRecord({"codec": codec["name"]})

    got, _ = _round({1: np.full((2, 2), 0.5, np.float32)}, change=to_fp16)
    # The strategy sees full float32 weights: global (0) + delta (0.5)
    assert got[0].reply.content["arrays"]["w"].numpy().tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert got[0].bytes_up < got[0].bytes_down  # counted as sent: fp16, not float32
    # An unknown codec is a malformed update: rejected with the valid names.
    codec["name"] = "zip"
    got, _ = _round({1: np.full((2, 2), 0.5, np.float32)}, change=to_fp16)
    assert got[0].status == "rejected" and "fp16, int8, topk" in got[0].reason


# -- hostile replies: a rejected reply, never an exception out of apply_filters ------------

def _content(arrays: dict[str, Array], codec: str | None = None, **metrics) -> RecordDict:
    content = reply_content(metrics=MetricRecord({"num-examples": 4, **metrics}),
                            arrays=ArrayRecord(arrays))
    if codec is not None:
        content[COMPRESSION_KEY] = ConfigRecord({"codec": codec})
    return content


def _layout(json_text: str) -> RecordDict:
    content = pack_content(update(np.ones((2, 2), np.float32), num_examples=4), "arrays")
    content[LAYOUT_KEY] = ConfigRecord({"record": "arrays", "json": json_text})
    return content


def _raw(data: bytes) -> Array:
    """An Array whose bytes are not what its header says (a hostile client can send any)."""
    return Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=data)


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones((2, 2), np.float32))
    return buffer.getvalue()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, w=np.ones((2, 2), np.float32))
    return buffer.getvalue()


def _with(content: RecordDict, key: str, values: dict) -> RecordDict:
    content[key] = ConfigRecord(values)
    return content


W = Array(np.ones((2, 2), np.float32))
HOSTILE = {
    "layout overruns its buffer": lambda: _layout(json.dumps([["w", "<f4", [9]]])),
    "layout shape overflows int64": lambda: _layout(json.dumps([["w", "<f4", [2**32, 2**32]]])),
    "layout dimension 2**63": lambda: _layout(json.dumps([["w", "<f4", [2**63]]])),
    "layout nested 10^5 deep": lambda: _layout("[" * 100_000),
    "list-valued metric": lambda: _content({"w": W}, **{"train/loss": [0.1, 0.2]}),
    "NaN example count": lambda: reply_content(metrics=MetricRecord(
        {"num-examples": float("nan")}), arrays=ArrayRecord({"w": W})),
    "no num-examples": lambda: reply_content(metrics=MetricRecord({"train/loss": 1.0}),
                                             arrays=ArrayRecord({"w": W})),
    "int8 with an empty scale": lambda: _content(
        {"w::q": Array(np.ones((2, 2), np.int8)), "w::s": Array(np.zeros(0, np.float32))},
        codec="int8"),
    "top-k index outside the tensor": lambda: _content(
        {"w::i": Array(np.array([0, 99], np.int32)), "w::v": Array(np.ones(2, np.float32))},
        codec="topk"),
    "fp16 of the wrong size": lambda: _content({"w::h": Array(np.ones(3, np.float16))},
                                               codec="fp16"),
    "compression without a codec": lambda: _with(_content(
        {"w::h": Array(np.ones((2, 2), np.float16))}), COMPRESSION_KEY, {"kind": "fp16"}),
    "ledger without json": lambda: _with(_content({"w": W}), LEDGER_KEY, {"text": "{}"}),
    "not-npy bytes": lambda: _content({"w": _raw(b"junkjunk")}),
    "truncated npy": lambda: _content({"w": _raw(_npy()[:-4])}),
}
STILL_RAISE = {  # NumPy's loader raises these outside UpdateError: name -> (reply, error)
    "empty array bytes": (lambda: _content({"w": _raw(b"")}), EOFError),
    "zip magic bytes": (lambda: _content({"w": _raw(b"PK\x03\x04" + bytes(40))}),
                        zipfile.BadZipFile),
    "an .npz archive": (lambda: _content({"w": _raw(_npz())}), AttributeError),
}


@pytest.mark.parametrize("name", [*HOSTILE, *STILL_RAISE])
def test_a_hostile_reply_is_rejected_and_the_others_still_filtered(name: str) -> None:
    # Arrange: the hostile reply first, an honest one after it
    hostile = _exchange(HOSTILE[name]() if name in HOSTILE else STILL_RAISE[name][0]())
    honest = _exchange(update(np.ones((2, 2), np.float32), num_examples=4))
    ctx = _ctx()
    # Act
    apply_filters([hostile, honest], ctx)
    # Assert
    assert hostile.status == "rejected" and hostile.reason
    assert honest.usable and dict(ctx.state.rejections) == {0: 1}


def test_a_nan_metric_is_kept_not_rejected() -> None:
    # A validation split holding one class has no AUC: NaN is a value, and the metric
    # aggregate skips it (transport.records.aggregate_metrics).
    e = _exchange(reply_content(metrics=metric_record({"val/auc": float("nan")},
                                                      num_examples=3)),
                  phase=MessageType.EVALUATE)
    apply_filters([e], _ctx())
    assert e.usable and e.metrics["val/auc"] != e.metrics["val/auc"]


@pytest.mark.parametrize("change", ["second ArrayRecord", "second MetricRecord",
                                    "an extra metric", "evaluation without num-examples"])
def test_a_reply_the_strategy_refuses_is_rejected_not_a_crashed_round(change: str) -> None:
    # Arrange: clients n = 1, 2, 3 send ones x n with n examples; client 1 (node 2) is odd.
    def odd(content: RecordDict, node: int, phase: str) -> None:
        if node != 2:
            return
        if change == "second ArrayRecord" and phase == MessageType.TRAIN:
            content["extra"] = ArrayRecord({"z": Array(np.ones(1, np.float32))})
        elif change == "second MetricRecord" and phase == MessageType.TRAIN:
            content["more"] = MetricRecord({"a": 1.0})
        elif change == "an extra metric" and phase == MessageType.TRAIN:
            content["metrics"]["extra/metric"] = 1.0
        elif change == "evaluation without num-examples" and phase == MessageType.EVALUATE:
            content["metrics"] = MetricRecord({"val/accuracy": 0.5})

    class _Odd(OfflineGrid):
        node_ids = [1, 2, 3]

        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for m in messages:
                node, phase = m.metadata.dst_node_id, m.metadata.message_type
                content = (update(np.full((2, 2), node, np.float32), num_examples=node)
                           if phase == MessageType.TRAIN else reply_content(
                               metrics=metric_record({"val/accuracy": 0.5}, num_examples=node)))
                odd(content, node, phase)
                replies.append(answer(m, content))
            return replies

    cfg = FedimgConfig(rounds=1, clients=3, fl=FederationConfig(min_train_clients=3,
                                                                min_evaluate_clients=3))
    recording = Recording()
    loop = offline_loop(cfg, _Odd(), reference=REFERENCE, callbacks=[recording])
    # Act
    loop.run()
    # Assert: the odd reply is rejected; training weighs the others: (1 x 1 + 3 x 3) / 4
    statuses = {(e.phase, e.partition_id): e.status for e in recording.results[1].exchanges}
    assert "rejected" in statuses.values()
    if change != "evaluation without num-examples":
        assert loop.state.arrays["w"].numpy().tolist() == [[2.5, 2.5], [2.5, 2.5]]


def test_a_reply_above_the_size_cap_is_refused_before_decoding() -> None:
    # Arrange: the model is 4 float32 = 16 bytes, so the default cap is 4 x 16 + 1 MB;
    # an explicit fl.max_reply_mb=1e-5 allows 10 bytes
    default = UpdateChecks(REFERENCE)
    tight = UpdateChecks(REFERENCE, fl=FederationConfig(max_reply_mb=1e-5))
    big = _exchange(update(np.ones((2, 2), np.float32), num_examples=4))
    big.bytes_up = 16
    # Act
    apply_filters([big], _ctx(tight))
    # Assert
    assert default.max_reply_bytes == 4 * 16 + 1_000_000 and tight.max_reply_bytes == 10
    assert big.status == "rejected" and "exceeds the 0.0 MB" in big.reason
    assert big.arrays is None  # nothing was decoded


def test_clients_holding_different_classes_are_not_rejected_for_their_count_keys() -> None:
    # Arrange: three evaluation replies whose per-class counts name different classes
    # (label skew), and one with an extra averaged metric
    def reply(pid: int, metrics: dict[str, float]) -> Exchange:
        sent = _sent(MessageType.EVALUATE, node=pid + 1)
        return Exchange(phase=MessageType.EVALUATE, partition_id=pid, node_id=pid + 1,
                        sent=sent, bytes_down=0, reply=answer(sent, reply_content(
                            metrics=metric_record(metrics, num_examples=4))))

    exchanges = [reply(0, {"val/accuracy": 0.5, "val/count/support/0": 4.0,
                           "val/count/hits/0": 2.0}),
                 reply(1, {"val/accuracy": 1.0, "val/count/support/3": 4.0,
                           "val/count/hits/3": 4.0}),
                 reply(2, {"val/accuracy": 0.75, "val/count/support/1": 2.0,
                           "val/count/hits/1": 1.0, "val/count/support/2": 2.0,
                           "val/count/hits/2": 2.0}),
                 reply(3, {"val/accuracy": 0.25, "val/extra": 1.0}),
                 reply(4, {"val/accuracy": 0.5})]
    hostile = exchanges[4].reply.content[METRICS_KEY]  # type: ignore[union-attr]
    hostile["val/count/support/0"] = [4.0, 1.0]  # a list, where a count belongs
    ctx = _ctx()
    # Act
    apply_filters(exchanges, ctx)
    # Assert: the count keys do not matter; the extra averaged metric does
    # (and a count that is not a number is a rejected reply, not a crash)
    assert [e.usable for e in exchanges] == [True, True, True, False, False]
    assert "['val/extra']" in exchanges[3].reason
    assert exchanges[4].status == "rejected"
    assert dict(ctx.state.rejections) == {3: 1, 4: 1}
    # ... and they were read once, set apart from the metrics and out of the replies
    assert exchanges[1].class_counts == {"val/count/support/3": 4.0, "val/count/hits/3": 4.0}
    assert exchanges[1].metrics == {"val/accuracy": 1.0}
    assert all("count" not in k for e in exchanges[:3]
               for k in e.reply.content[METRICS_KEY])  # type: ignore[union-attr]
    # recall per class, summed over clients: 2/4, 4/4, 1/2, 2/2 -> mean 0.75
    assert pooled_validation(exchanges) == {"val/pooled_balanced_accuracy": 0.75}
