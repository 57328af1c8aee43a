"""Fed3R's statistics round on the server: honest sums add up, hostile replies are left out."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from offline_grid import OfflineGrid, answer

from fedimg.errors import FedimgError
from fedimg.serverapp import head_init
from fedimg.serverapp.head_init import collect_statistics
from fedimg.training.closed_form import HeadStatistics
from fedimg.transport.grid import Transport
from fedimg.transport.records import HEAD_STATS_KEY, cohort_partitions, cohort_reply

D, K = 3, 2  # head features and classes: sums are (4, 4) and (4, 2)


def _sums(node: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Node n's honest sums: n images of class n % 2 with features (n, 1, 0) and 1."""
    phi = np.tile(np.array([node, 1.0, 0.0, 1.0]), (node, 1))
    y = np.zeros((node, K))
    y[:, node % 2] = 1
    return phi.T @ phi, phi.T @ y, node


def _content(gram: np.ndarray, moment: np.ndarray, count: float) -> RecordDict:
    return RecordDict({HEAD_STATS_KEY: ArrayRecord({"gram": Array(gram), "moment": Array(moment)}),
                       "metrics": MetricRecord({"num-examples": count})})


class _Scripted(OfflineGrid):
    def __init__(self, replies: dict[int, Callable[[], RecordDict]]) -> None:
        self.node_ids, self.replies = sorted(replies), replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return [answer(m, self.replies[m.metadata.dst_node_id]()) for m in messages]


def _collect(replies: dict[int, Callable[[], RecordDict]], *,
             min_replies: int = 1) -> tuple[HeadStatistics, int]:
    transport = Transport(_Scripted(replies))
    transport.node_to_partition = {node: node for node in replies}
    return collect_statistics(transport, RecordDict(), head_shape=(K, D),
                              expected_sizes={node: node for node in replies},
                              timeout=5, min_replies=min_replies)


def test_honest_sums_are_added_and_hostile_ones_left_out(caplog) -> None:
    # Arrange: nodes 1 and 2 honest; nodes 3.. each hostile in its own way
    honest = {n: (lambda n=n: _content(*_sums(n))) for n in (1, 2)}
    g, m, _ = _sums(3)
    asymmetric = g.copy()
    asymmetric[0, 1] += 1
    hostile = {
        3: lambda: _content(np.zeros((5, 5)), m, 3),  # wrong shape
        4: lambda: _content(*_sums(4)[:2], 5),  # more images than the client has
        5: lambda: _content(np.full((4, 4), np.nan), np.zeros((4, K)), 5),  # NaN
        6: lambda: _content(asymmetric * 2, m * 2, 6),  # not symmetric
        7: lambda: RecordDict({"metrics": MetricRecord({"num-examples": 7})}),  # no sums
        8: lambda: _content(np.diag([-1.0, 1, 1, 8]), np.array([[0, 0]] * 3 + [[8, 0]],
                                                              dtype=float), 8),  # negative
        # symmetric, counts right, but indefinite: [[1, 5], [5, 1]] has eigenvalue -4
        9: lambda: _content(np.array([[1.0, 5, 0, 0], [5, 1, 0, 0], [0, 0, 0, 0],
                                      [0, 0, 0, 9]]), np.array([[0, 0]] * 3 + [[9, 0]],
                                                               dtype=float), 9),
        10: lambda: _content(_sums(10)[0] * 1e15, _sums(10)[1], 10),  # finite, but huge
    }
    # Act
    total, used = _collect({**honest, **hostile})
    # Assert: exactly the honest sums
    assert used == 2 and total.count == 3
    reasons = " | ".join(r.getMessage() for r in caplog.records)
    for reason in ("shapes", "5 images, the client has 4", "non-finite", "not symmetric",
                   "malformed reply", "non-negative diagonal", "not positive semi-definite",
                   "sums larger than"):
        assert reason in reasons, reason
    want_g, want_m = _sums(1)[0] + _sums(2)[0], _sums(1)[1] + _sums(2)[1]
    assert torch.equal(total.gram, torch.from_numpy(want_g))
    assert torch.equal(total.moment, torch.from_numpy(want_m))


def test_too_few_usable_replies_stop_the_run_before_round_1() -> None:
    replies = {1: lambda: _content(*_sums(1)), 2: lambda: _content(np.zeros((1, 1)),
                                                                   np.zeros((1, 1)), 2)}
    with pytest.raises(FedimgError, match=r"fl.head_init=ridge: 1 usable replies of 2, "
                                          r"fl.min_replies=2; client 2: shapes"):
        _collect(replies, min_replies=2)


def test_a_large_fleet_is_queried_in_batches_that_fit_and_sums_the_same(monkeypatch) -> None:
    # Arrange: one reply is 4 x 6 float64 = 192 bytes; a 400-byte limit holds 2 of them
    monkeypatch.setattr(head_init, "MAX_REPLY_BYTES", 400)
    replies = {n: (lambda n=n: _content(*_sums(n))) for n in range(1, 6)}
    sent: list[list[int]] = []

    class _Counting(_Scripted):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            sent.append([m.metadata.dst_node_id for m in messages])
            return super().send_and_receive(messages, timeout=timeout)

    transport = Transport(_Counting(replies))
    transport.node_to_partition = {node: node for node in replies}
    # Act
    total, used = collect_statistics(transport, RecordDict(), head_shape=(K, D),
                                     expected_sizes={n: n for n in replies}, timeout=5,
                                     min_replies=1)
    # Assert: three batches in client order, and the sums of all five, to the bit
    assert sent == [[1, 2], [3, 4], [5]]
    assert used == 5 and total.count == 15
    assert torch.equal(total.gram, torch.from_numpy(sum(_sums(n)[0] for n in replies)))
    assert torch.equal(total.moment, torch.from_numpy(sum(_sums(n)[1] for n in replies)))


def test_a_head_whose_single_reply_cannot_fit_is_refused_before_sending() -> None:
    with pytest.raises(FedimgError, match=r"one client's feature sums \(20001x20001 float64\) "
                                          r"need 3.0 GiB .* Fix: a model with a smaller"):
        head_init.reply_batches([1, 2], dim=20001, classes=2)


def test_a_batch_of_honest_sums_is_factorised_once_not_once_per_reply(monkeypatch) -> None:
    # Arrange: five honest replies in one batch; count the Cholesky checks
    calls: list[int] = []
    factorises = head_init._factorises
    monkeypatch.setattr(head_init, "_factorises",
                        lambda gram: calls.append(1) or factorises(gram))
    # Act
    total, used = _collect({n: (lambda n=n: _content(*_sums(n))) for n in range(1, 6)})
    # Assert
    assert used == 5 and total.count == 15 and len(calls) == 1


def test_cohorts_of_queries_sum_the_same_and_still_check_each_member(caplog) -> None:
    # Arrange: 5 nodes, node 4 hostile; the grid answers a cohort message for each member
    replies = {n: (lambda n=n: _content(*_sums(n))) for n in (1, 2, 3, 5)}
    replies[4] = lambda: _content(*_sums(4)[:2], 5)  # more images than it has
    sent: list[list[int]] = []

    class _Cohorts(_Scripted):
        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for m in messages:
                members = cohort_partitions(m.content) or [m.metadata.dst_node_id]
                sent.append(members)
                out.append(answer(m, cohort_reply([self.replies[p]() for p in members])
                                  if len(members) > 1 else self.replies[members[0]]()))
            return out

    transport = Transport(_Cohorts(replies))
    transport.node_to_partition = {node: node for node in replies}
    # Act
    total, used = collect_statistics(transport, RecordDict(), head_shape=(K, D),
                                     expected_sizes={n: n for n in replies}, timeout=5,
                                     min_replies=1, cohort_size=2)
    # Assert: three messages for five clients; node 4 alone left out; the others' sums
    assert sent == [[1, 2], [3, 4], [5]]
    assert used == 4 and total.count == 11
    assert "of client 4 left out: 5 images, the client has 4" in caplog.text
    assert torch.equal(total.gram, torch.from_numpy(sum(_sums(n)[0] for n in (1, 2, 3, 5))))
    assert torch.equal(total.moment, torch.from_numpy(sum(_sums(n)[1] for n in (1, 2, 3, 5))))


@pytest.mark.parametrize("where", [(0, 1), (299, 3), (130, 257)])
def test_the_blocked_asymmetry_is_the_plain_one(where) -> None:
    # 300 is not a multiple of the 128 block: the last, partial blocks count too
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(7, 300))
    gram = phi.T @ phi
    gram = (gram + gram.T) / 2  # exactly symmetric
    assert head_init._asymmetry(gram) == 0.0
    gram[where] += 0.5
    assert head_init._asymmetry(gram) == np.abs(gram - gram.T).max()  # the same float
    assert head_init._asymmetry(gram) == pytest.approx(0.5)
