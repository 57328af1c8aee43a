"""The round loop: Flower's FedAvg driven round by round, and the short-round policy."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
from flwr.serverapp.strategy import FedAvg
from offline_grid import OfflineGrid

from fedimg.config import FedimgConfig, FederationConfig
from fedimg.errors import RunStopped
from fedimg.transport.grid import InstrumentedGrid
from fedimg.transport.records import ARRAYS_KEY, metric_record, reply_content
from fedimg.serverapp.loop import RoundLoop, RoundOutcome

REFERENCE = {"w": torch.zeros(3)}


class _FlakyGrid(OfflineGrid):
    """Three clients; each adds (node id) to the weights it gets, unless told to fail.

    ``failing`` holds one set of node ids per training call, consumed in order.
    """

    def __init__(self, failing: list[set[int]]) -> None:
        self.failing = failing
        self.train_calls = 0

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type == "train"
        down = self.failing[self.train_calls] if is_train and self.train_calls < len(
            self.failing) else set()
        self.train_calls += is_train
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in down:
                replies.append(m.create_error_reply(Error(code=0, reason="worker died")))
                continue
            sent = m.content[ARRAYS_KEY]["w"].numpy()
            arrays = ArrayRecord({"w": Array((sent + node).astype(np.float32))})
            content = reply_content(metrics=metric_record({"train/loss": 0.5},
                                                          num_examples=node), arrays=arrays)
            replies.append(Message(content, reply_to=m))
        for reply, m in zip(replies, messages):
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
        return replies


def _loop(failing: list[set[int]], **fl) -> tuple[RoundLoop, list]:
    cfg = FedimgConfig(rounds=3, clients=3, fl=FederationConfig(
        min_train_clients=3, min_evaluate_clients=0, fraction_evaluate=0.0, **fl))
    grid = InstrumentedGrid(_FlakyGrid(failing), reference=REFERENCE)
    grid.node_to_partition = {1: 0, 2: 1, 3: 2}
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=3, min_available_nodes=3,
                      fraction_evaluate=0.0, min_evaluate_nodes=0)
    loop = RoundLoop(cfg, strategy, grid, train_config=ConfigRecord(),
                     evaluate_config=ConfigRecord())
    seen: list = []
    return loop, seen


def _record(seen: list):
    def on_round_end(r: int, arrays: ArrayRecord, outcome: RoundOutcome | None) -> None:
        seen.append((r, float(arrays["w"].numpy()[0]), outcome and outcome.attempts,
                     outcome and outcome.skipped))
    return on_round_end


def test_fedavg_aggregates_the_replies_that_arrived() -> None:
    # Round 1: node 3 dies; the weighted mean of +1 (weight 1) and +2 (weight 2) is 5/3.
    loop, seen = _loop([{3}, set(), set()])
    loop.run(ArrayRecord({"w": Array(np.zeros(3, np.float32))}), start=1,
             on_round_end=_record(seen))
    # Rounds 2 and 3 have all three: + (1 + 4 + 9) / 6 = 14/6 each.
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[1][1] == pytest.approx(5 / 3)
    assert seen[3][1] == pytest.approx(5 / 3 + 2 * 14 / 6)
    assert [s[2] for s in seen[1:]] == [1, 1, 1]


def test_short_round_is_retried_then_skipped_and_the_model_kept() -> None:
    # min_replies=2: round 1 loses two clients twice (retry), then succeeds on attempt 3.
    # Round 2 loses two clients on all 3 attempts: skipped, weights unchanged.
    failing = [{2, 3}, {1, 3}, set(), {2, 3}, {1, 2}, {1, 3}, set()]
    loop, seen = _loop(failing, min_replies=2, on_too_few="retry", round_retries=2)
    loop.run(ArrayRecord({"w": Array(np.zeros(3, np.float32))}), start=1,
             on_round_end=_record(seen))
    assert seen[1][2:] == (3, False) and seen[1][1] == pytest.approx(14 / 6)
    assert seen[2][2:] == (3, True) and seen[2][1] == pytest.approx(14 / 6)
    assert seen[3][2:] == (1, False) and seen[3][1] == pytest.approx(2 * 14 / 6)
    # Every attempt's failures are in the records the tracker will drain, and the
    # updates of attempts that were not aggregated are marked as discarded.
    statuses = [e.status for e in loop.grid.drain() if e.phase == "train"]
    assert statuses.count("failed") == 2 + 2 + 2 + 2 + 2
    assert statuses.count("discarded") == 1 + 1 + 1 + 1 + 1


def test_skip_and_stop_policies() -> None:
    loop, seen = _loop([{1, 2, 3}], on_too_few="skip")
    loop.run(ArrayRecord({"w": Array(np.zeros(3, np.float32))}), start=2,
             on_round_end=_record(seen))
    assert seen[0] == (2, 0.0, 1, True) and seen[1][3] is False  # no round 0 on resume
    loop, seen = _loop([set(), {1, 2, 3}], on_too_few="stop")
    with pytest.raises(RunStopped, match="round 2: too few usable updates"):
        loop.run(ArrayRecord({"w": Array(np.zeros(3, np.float32))}), start=1,
                 on_round_end=_record(seen))
    assert [s[0] for s in seen] == [0, 1, 2]  # the stopped round is still recorded
    assert seen[2][1:] == (pytest.approx(14 / 6), 0, True)


def test_repeated_skips_end_the_run() -> None:
    loop, seen = _loop([{1, 2, 3}] * 9, on_too_few="retry", round_retries=0,
                       max_skipped_rounds=2)
    with pytest.raises(RunStopped, match="2 rounds in a row were skipped"):
        loop.run(ArrayRecord({"w": Array(np.zeros(3, np.float32))}), start=1,
                 on_round_end=_record(seen))
    assert [s[3] for s in seen[1:]] == [True, True]


def test_a_round_without_enough_connected_nodes_is_skipped_not_hung() -> None:
    # Flower's sampling would wait forever for 3 nodes when only 2 are connected.
    loop, seen = _loop([], on_too_few="skip", connect_timeout_s=0.3)
    loop.grid.inner.node_ids = [1, 2]
    started = time.monotonic()
    loop.run(ArrayRecord({"w": Array(np.zeros(3, np.float32))}), start=3,
             on_round_end=_record(seen))
    assert seen == [(3, 0.0, 1, True)]
    assert time.monotonic() - started < 5
