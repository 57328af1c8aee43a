"""2,000 seeded malformed replies through the real transport, reply filters and FedAvg.

Each round, three honest clients send known updates and twenty hostile ones send a
reply mutated at random (layouts, types, shapes, sizes, codec payloads, metric
records, counts, extra records). No exception may leave the round; every hostile
reply must be recorded as rejected; and the aggregate must equal, bit for bit, the
aggregate of the same round without the hostile clients.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from offline_grid import OfflineGrid, Recording, answer, offline_loop

from fedimg.config import FedimgConfig, FederationConfig
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.packing import LAYOUT_KEY, pack_content
from fedimg.transport.records import (
    ARRAYS_KEY,
    COMPRESSION_KEY,
    LEDGER_KEY,
    METRICS_KEY,
    metric_record,
    reply_content,
)

REFERENCE = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.zeros((), dtype=torch.int64)}
HONEST = (1, 2, 3)  # nodes; node n sends n * ones with n examples
HOSTILE = tuple(range(4, 24))  # 20 hostile nodes a round
ROUNDS = 100  # 100 x 20 = 2,000 hostile replies


def _honest(node: int) -> RecordDict:
    arrays = {"w": np.full((2, 3), node, np.float32), "b": np.full(3, -node, np.float32),
              "n": np.array(node, np.int64)}
    return reply_content(metrics=metric_record({"train/loss": 0.5}, num_examples=node),
                         arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}))


def _raw(data: bytes, shape: tuple[int, ...] = (2, 3), dtype: str = "float32") -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def _with_arrays(arrays: dict[str, Array], **extra: ConfigRecord) -> RecordDict:
    content = reply_content(metrics=metric_record({"train/loss": 0.5}, num_examples=4),
                            arrays=ArrayRecord(arrays))
    for key, record in extra.items():
        content[key] = record
    return content


def _good_arrays() -> dict[str, Array]:
    return {k: Array(v.numpy()) for k, v in _honest(4)[ARRAYS_KEY].items()}


def _bad_layout(rng: np.random.Generator) -> RecordDict:
    packed = pack_content(_honest(4), ARRAYS_KEY)
    layouts = [[["w", "<f4", [2 ** 32, 2 ** 32]]], [["w", "<f4", [-1, 3]]], "not a list",
               [["w", "|O", [2, 3]]], [["w"]], [[["nested"] * 3]], [["w", "<f4", [2, 3]]] * 9,
               [["w", "<f4", [10 ** 6]]], {"w": 1}, [["b", "<f8", [3]], ["n", "<i8", []]]]
    layout = layouts[rng.integers(len(layouts))]
    packed[LAYOUT_KEY] = ConfigRecord({"record": ARRAYS_KEY, "json": json.dumps(layout)})
    return packed


def _bad_metrics(rng: np.random.Generator) -> RecordDict:
    records = [MetricRecord({"train/loss": 0.5}), MetricRecord({"num-examples": -4}),
               MetricRecord({"num-examples": 4.5}), MetricRecord({"num-examples": 10 ** 12}),
               MetricRecord({"num-examples": 4, "train/loss": float("inf")}),
               MetricRecord({"num-examples": 4, "train/loss": [0.1, 0.2]}),
               MetricRecord({"num-examples": [4, 4]}),
               MetricRecord({"num-examples": float("nan")}),
               MetricRecord({"num-examples": 4, "other/key": 1.0})]
    content = RecordDict({ARRAYS_KEY: ArrayRecord(_good_arrays()),
                          METRICS_KEY: records[rng.integers(len(records))]})
    return content


def _bad_arrays(rng: np.random.Generator) -> RecordDict:
    arrays = _good_arrays()
    key = ["w", "b", "n"][rng.integers(3)]
    choices: list[Callable[[], None]] = [
        lambda: arrays.pop(key),
        lambda: arrays.update(extra=Array(np.ones(2, np.float32))),
        lambda: arrays.update({key: Array(np.ones((3, 2), np.float32))}),
        lambda: arrays.update({key: Array(np.ones((2, 3), np.float64))}),
        lambda: arrays.update({key: Array(np.full((2, 3), np.nan, np.float32))}),
        lambda: arrays.update({key: _raw(rng.bytes(int(rng.integers(0, 40))))}),
        lambda: arrays.update({key: _raw(b"", shape=(0,))}),
        lambda: arrays.update({key: _raw(b"PK\x03\x04" + rng.bytes(30))}),
    ]
    choices[rng.integers(len(choices))]()
    return _with_arrays(arrays)


def _bad_codec(rng: np.random.Generator) -> RecordDict:
    parts = [{"w::q": Array(np.ones((2, 3), np.int8)), "w::s": Array(np.zeros(0, np.float32))},
             {"w::i": Array(np.array([0, 99], np.int32)), "w::v": Array(np.ones(2, np.float32))},
             {"w::h": Array(np.ones(5, np.float16))}, {"b::h": Array(np.ones(3, np.float16))},
             {"w": Array(np.ones((2, 3), np.float32))}]
    codecs = ["int8", "topk", "fp16", "gzip", ""]
    payload = parts[rng.integers(len(parts))]
    codec = codecs[rng.integers(len(codecs))]
    return _with_arrays(dict(payload), **{COMPRESSION_KEY: ConfigRecord({"codec": codec})})


def _bad_records(rng: np.random.Generator) -> RecordDict:
    content = _honest(4)
    extras: list[Callable[[], None]] = [
        lambda: content.__setitem__("extra", ArrayRecord({"z": Array(np.ones(1, np.float32))})),
        lambda: content.__setitem__("more", MetricRecord({"a": 1.0})),
        lambda: content.__setitem__("cfg", ConfigRecord({"x": 1})),
        lambda: content.__setitem__(LEDGER_KEY, ConfigRecord({"text": "{}"})),
        lambda: content.__delitem__(ARRAYS_KEY),
        lambda: content.__delitem__(METRICS_KEY),
    ]
    extras[rng.integers(len(extras))]()
    return content


MUTATIONS = (_bad_layout, _bad_metrics, _bad_arrays, _bad_codec, _bad_records)


class _FuzzGrid(OfflineGrid):
    def __init__(self, *, hostile: bool, seed: int) -> None:
        self.node_ids = list(HONEST + (HOSTILE if hostile else ()))
        self.rng = np.random.default_rng(seed)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in HONEST:
                replies.append(answer(m, _honest(node)))
            else:
                mutate = MUTATIONS[self.rng.integers(len(MUTATIONS))]
                replies.append(answer(m, mutate(self.rng)))
        return replies


def _run(hostile: bool) -> tuple[Recording, dict[str, np.ndarray]]:
    nodes = HONEST + (HOSTILE if hostile else ())
    cfg = FedimgConfig(rounds=ROUNDS, clients=len(nodes), fl=FederationConfig(
        min_train_clients=1, fraction_evaluate=0, min_evaluate_clients=0,
        norm_outlier_factor=0, on_too_few="skip", max_skipped_rounds=ROUNDS))
    sizes = {n - 1: 4 for n in HOSTILE} | {n - 1: n for n in HONEST}
    checks = UpdateChecks(REFERENCE, fl=cfg.fl, fixed_keys=frozenset({"n"}),
                          expected_sizes={k: v for k, v in sizes.items() if k < len(nodes)})
    recording = Recording()
    loop = offline_loop(cfg, _FuzzGrid(hostile=hostile, seed=7), reference=REFERENCE,
                        callbacks=[recording], checks=checks)
    loop.run()
    return recording, {k: v.numpy() for k, v in loop.state.arrays.items()}


def test_two_thousand_hostile_replies_are_rejected_and_change_nothing() -> None:
    # Arrange / Act: the same 100 rounds with and without 20 hostile clients each
    fuzzed, arrays = _run(hostile=True)
    clean, expected = _run(hostile=False)
    # Assert: every round ran, every hostile reply was rejected, the honest ones used
    trained = fuzzed.results[1:]
    assert len(trained) == ROUNDS
    hostile = [e for r in trained for e in r.exchanges if e.node_id in HOSTILE]
    assert len(hostile) == 2000
    assert {e.status for e in hostile} == {"rejected"} and all(e.reason for e in hostile)
    assert all(sum(e.usable for e in r.exchanges) == 3 for r in trained)
    # the aggregate is the honest one, bit for bit: FedAvg of n x ones with weights n
    for key in expected:
        assert np.array_equal(arrays[key], expected[key]), key
    np.testing.assert_allclose(arrays["w"], np.full((2, 3), (1 + 4 + 9) / 6), rtol=1e-6)
    assert [r["train/loss"] for r in fuzzed.records[1:]] == \
        [r["train/loss"] for r in clean.records[1:]]
