"""The round loop: sampling, FedAvg driven round by round, the short-round policy, run state."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType
from offline_grid import OfflineGrid, Recording, answer, offline_loop, update

from fedimg.config import FedimgConfig, FederationConfig
from fedimg.errors import PrivacyBudgetExhausted, RunStopped
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.records import (
    ARRAYS_KEY,
    ATTEMPT_KEY,
    DECLINED_KEY,
    LEDGER_KEY,
    PARTITION_KEY,
    metric_record,
    reply_content,
)

REFERENCE = {"w": torch.zeros(3)}


class _FlakyGrid(OfflineGrid):
    """Clients that add their node id n to the weights they get and weigh n examples.

    ``failing`` holds one set of node ids per training exchange, consumed in order;
    those nodes answer with an error. Evaluation replies val/accuracy = n / 10.
    """

    def __init__(self, failing: list[set[int]], nodes: Iterable[int] = (1, 2, 3)) -> None:
        self.failing, self.node_ids = failing, list(nodes)
        self.train_calls = 0
        self.sent: list[tuple[str, int, object, str]] = []  # phase, node, attempt, ledger
        self.ledger_from: dict[int, str] = {}  # node -> ledger it reports (training)

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        messages = list(messages)
        train = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN
        down = self.failing[self.train_calls] if train and self.train_calls < len(
            self.failing) else set()
        self.train_calls += train
        replies = []
        for m in messages:
            node, ledger = m.metadata.dst_node_id, m.content.config_records.get(LEDGER_KEY)
            self.sent.append((m.metadata.message_type, node,
                              m.content["config"].get(ATTEMPT_KEY),
                              str(ledger["json"]) if ledger is not None else ""))
            if node in down:
                replies.append(answer(m, Error(code=0, reason="worker died")))
            elif not train:
                replies.append(answer(m, reply_content(metrics=metric_record(
                    {"val/accuracy": node / 10}, num_examples=node))))
            else:
                content = update(m.content[ARRAYS_KEY]["w"].numpy() + node, num_examples=node,
                                 **{"train/loss": 0.5})
                if node in self.ledger_from:
                    content[LEDGER_KEY] = ConfigRecord({"json": self.ledger_from[node]})
                replies.append(answer(m, content))
        return replies

    def trained(self) -> list[int]:
        return [node for phase, node, _, _ in self.sent if phase == MessageType.TRAIN]


def _cfg(**fl) -> FedimgConfig:
    fl = {"min_train_clients": 3, "min_evaluate_clients": 0, "fraction_evaluate": 0.0, **fl}
    return FedimgConfig(rounds=3, clients=3, fl=FederationConfig(**fl))


def _loop(failing: list[set[int]], **fl):
    recording = Recording()
    loop = offline_loop(_cfg(**fl), _FlakyGrid(failing), reference=REFERENCE,
                        callbacks=[recording])
    return loop, recording


def _seen(recording: Recording) -> list[tuple[int, float, int, bool]]:
    """(round, w[0] after it, attempts, skipped) of every recorded round."""
    return [(r.server_round, float(r.state_dict["w"][0]), r.attempts, r.skipped)
            for r in recording.results]


def _resumed_after(loop, server_round: int) -> None:
    loop.state.round, loop.state.rounds = server_round, [{"round": server_round}]


def test_fedavg_aggregates_the_replies_that_arrived() -> None:
    # Arrange: round 1 node 3 dies; rounds 2 and 3 have all three.
    loop, recording = _loop([{3}, set(), set()])
    # Act
    loop.run()
    # Assert: round 1 is the weighted mean of +1 (weight 1) and +2 (weight 2): 5/3;
    # rounds 2 and 3 add (1 + 4 + 9) / 6 = 14/6 each.
    seen = _seen(recording)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[1][1] == pytest.approx(5 / 3)
    assert seen[3][1] == pytest.approx(5 / 3 + 2 * 14 / 6)
    assert [s[2] for s in seen[1:]] == [1, 1, 1]
    # The run state moved with it: its round, its records and its global model.
    assert loop.state.round == 3 and [r["round"] for r in loop.state.rounds] == [0, 1, 2, 3]
    np.testing.assert_allclose(loop.state.arrays["w"].numpy(), [5 / 3 + 28 / 6] * 3, rtol=1e-6)


def test_short_round_is_retried_then_skipped_and_the_model_kept() -> None:
    # Arrange: min_replies=2. Round 1 loses two clients twice, then succeeds on attempt 3;
    # round 2 loses two clients on all 3 attempts: skipped, weights unchanged.
    failing = [{2, 3}, {1, 3}, set(), {2, 3}, {1, 2}, {1, 3}, set()]
    loop, recording = _loop(failing, min_replies=2, on_too_few="retry", round_retries=2)
    # Act
    loop.run()
    # Assert
    seen = _seen(recording)
    assert seen[1][2:] == (3, False) and seen[1][1] == pytest.approx(14 / 6)
    assert seen[2][2:] == (3, True) and seen[2][1] == pytest.approx(14 / 6)
    assert seen[3][2:] == (1, False) and seen[3][1] == pytest.approx(2 * 14 / 6)
    # Every attempt's exchanges are in its round's result; the updates of attempts that
    # were not aggregated are marked discarded. Each attempt tells clients its number.
    statuses = [e.status for r in recording.results for e in r.exchanges]
    assert statuses.count("failed") == 2 + 2 + 2 + 2 + 2
    assert statuses.count("discarded") == 1 + 1 + 1 + 1 + 1
    attempts = [a for phase, node, a, _ in loop.transport.grid.sent if node == 1]
    assert attempts == [1, 2, 3, 1, 2, 3, 1]
    assert loop.state.skips == 0  # round 3 was not skipped: the count starts again


def test_skip_and_stop_policies() -> None:
    # skip: a resumed run (after round 1) records no round 0; the model is kept.
    loop, recording = _loop([{1, 2, 3}], on_too_few="skip")
    _resumed_after(loop, 1)
    loop.run()
    seen = _seen(recording)
    assert seen[0] == (2, 0.0, 1, True) and seen[1][3] is False
    # stop: the stopped round is still recorded, with the weights of round 1.
    loop, recording = _loop([set(), {1, 2, 3}], on_too_few="stop")
    with pytest.raises(RunStopped, match="round 2: too few usable updates"):
        loop.run()
    seen = _seen(recording)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert seen[2][1] == pytest.approx(14 / 6) and recording.results[2].stopped
    assert loop.state.round == 1  # round 2 never completed


def test_repeated_skips_end_the_run() -> None:
    loop, recording = _loop([{1, 2, 3}] * 9, on_too_few="retry", round_retries=0,
                            max_skipped_rounds=2)
    with pytest.raises(RunStopped, match="2 rounds in a row were skipped"):
        loop.run()
    assert [s[3] for s in _seen(recording)[1:]] == [True, True]
    assert loop.state.skips == 2


def test_a_round_without_enough_connected_nodes_is_skipped_not_hung() -> None:
    # Three clients are needed and two are connected: fl.connect_timeout_s bounds the wait.
    loop, recording = _loop([], on_too_few="skip", connect_timeout_s=0.3)
    loop.transport.grid.node_ids = [1, 2]
    _resumed_after(loop, 2)
    started = time.monotonic()
    loop.run()
    assert _seen(recording) == [(3, 0.0, 1, True)]
    assert time.monotonic() - started < 5
    assert loop.state.skips == 1


def test_clients_are_sampled_from_the_rounds_own_generator() -> None:
    # Arrange: 5 clients, 40% per round = 2, evaluation of 2 as well, seed 7.
    cfg = FedimgConfig(rounds=2, clients=5, seed=7, fl=FederationConfig(
        fraction_train=0.4, min_train_clients=2, fraction_evaluate=0.4,
        min_evaluate_clients=2))
    grid = _FlakyGrid([], nodes=range(1, 6))
    loop = offline_loop(cfg, grid, reference=REFERENCE, callbacks=[Recording()])
    # Act
    loop.run()
    # Assert: round r draws train then evaluation from Random("7-r") over nodes 1..5.
    expected = []
    for r in (1, 2):
        rng = random.Random(f"7-{r}")
        expected.append((sorted(rng.sample([1, 2, 3, 4, 5], 2)),
                         sorted(rng.sample([1, 2, 3, 4, 5], 2))))
    sent = [(p, n) for p, n, _, _ in grid.sent]
    got = [(sorted(n for p, n in sent[4 * i:4 * i + 4] if p == MessageType.TRAIN),
            sorted(n for p, n in sent[4 * i:4 * i + 4] if p == MessageType.EVALUATE))
           for i in range(2)]
    assert got == expected


def test_federated_evaluation_is_the_example_weighted_mean() -> None:
    # val/accuracy n / 10 with n examples: (1 x 0.1 + 2 x 0.2 + 3 x 0.3) / 6 = 1.4 / 6.
    recording = Recording()
    loop = offline_loop(_cfg(fraction_evaluate=1.0), _FlakyGrid([]), reference=REFERENCE,
                        callbacks=[recording])
    loop.run()
    assert recording.records[1]["val/accuracy"] == pytest.approx(1.4 / 6)
    assert recording.records[1]["train/loss"] == pytest.approx(0.5)
    assert "val/accuracy" not in recording.records[0]  # round 0: only the initial model


def test_a_restored_ledger_goes_to_its_own_client_until_it_reports_one() -> None:
    # Arrange: a resumed server holds client 1's ledger (node 2); client 1 reports its
    # own ledger in its round-2 reply.
    grid = _FlakyGrid([])
    loop = offline_loop(_cfg(fraction_evaluate=1.0), grid, reference=REFERENCE)
    loop.state.ledgers, loop.state.ledgers_to_return = {1: '{"history": []}'}, {1}
    # Act: round 1, then round 2 with the report
    loop.train(1, random.Random(0))
    grid.ledger_from = {2: '{"history": [[1.0, 0.1, 2]]}'}
    loop.train(2, random.Random(0))
    loop.train(3, random.Random(0))
    # Assert: only client 1's training messages carried it, until it replied with one.
    carried = {n: [led for p, node, _, led in grid.sent if node == n] for n in (1, 2, 3)}
    assert carried == {1: ["", "", ""], 2: ['{"history": []}'] * 2 + [""], 3: ["", "", ""]}
    assert loop.state.ledgers == {1: '{"history": [[1.0, 0.1, 2]]}'}
    assert loop.state.ledgers_to_return == set()


def test_the_run_context_rides_in_every_message() -> None:
    from flwr.app import Array, ArrayRecord

    context = {PARTITION_KEY: ArrayRecord({"sizes": Array(np.zeros((3, 2), np.int64))})}
    seen: list[bool] = []

    class _Checking(_FlakyGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            seen.extend(PARTITION_KEY in m.content.array_records for m in messages)
            return super().send_and_receive(messages, timeout=timeout)

    loop = offline_loop(_cfg(fraction_evaluate=1.0), _Checking([]), reference=REFERENCE,
                        context=context)
    loop.train(1, random.Random(0))
    loop.evaluate(1, random.Random(0), loop.train(2, random.Random(0)))
    assert seen == [True] * 9  # 3 train, 3 train, 3 evaluate


def test_every_client_declining_ends_the_run_as_a_spent_budget() -> None:
    class _Declining(_FlakyGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = list(super().send_and_receive(messages, timeout=timeout))
            for reply in replies:
                reply.content[DECLINED_KEY] = ConfigRecord({"reason": "epsilon 8 spent"})
            return replies

    recording = Recording()
    loop = offline_loop(_cfg(), _Declining([]), reference=REFERENCE, callbacks=[recording])
    with pytest.raises(PrivacyBudgetExhausted, match="round 1: every sampled client declined"):
        loop.run()
    assert [r.server_round for r in recording.results] == [0, 1]
    assert recording.results[1].stopped and loop.state.round == 0


class _Hung(Exception):
    """Flower's sample_nodes went to sleep waiting for nodes: the round would hang."""


def test_an_evaluation_sample_of_no_clients_sends_nothing(monkeypatch) -> None:
    import flwr.serverapp.strategy.strategy_utils as strategy_utils

    def hung(seconds: float) -> None:
        raise _Hung

    monkeypatch.setattr(strategy_utils, "sleep", hung)
    cfg = FedimgConfig(rounds=1, clients=5, fl=FederationConfig(
        min_train_clients=1, fraction_evaluate=0.1, min_evaluate_clients=0))
    recording = Recording()
    loop = offline_loop(cfg, _FlakyGrid([], nodes=range(1, 6)), reference=REFERENCE,
                        callbacks=[recording])
    loop.run()
    assert loop.state.round == 1 and "val/accuracy" not in recording.records[1]


def test_a_stopped_round_keeps_the_client_statuses_that_stopped_it() -> None:
    # Round 2: all three clients fail on its one attempt (fl.on_too_few=stop).
    loop, recording = _loop([set(), {1, 2, 3}], on_too_few="stop")
    with pytest.raises(RunStopped):
        loop.run()
    assert [e.status for e in recording.results[2].exchanges] == ["failed"] * 3


class _FrozenGrid(OfflineGrid):
    """Clients that move "w" by their node id and return "frozen" exactly as sent."""

    def __init__(self) -> None:
        self.node_ids = [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            node, arrays = m.metadata.dst_node_id, m.content[ARRAYS_KEY]
            content = update(arrays["w"].numpy() + node, num_examples=node + 2)
            content[ARRAYS_KEY]["frozen"] = arrays["frozen"]
            replies.append(answer(m, content))
        return replies


def test_frozen_arrays_pass_through_the_mean_to_the_bit() -> None:
    """FedAvg of equal float32 values is not that value to the bit; the loop keeps it.

    Weights 3, 4 and 5 out of 12: float32(3/12 x + 4/12 x + 5/12 x) != x for some x,
    which would make every client's frozen-trunk feature cache rebuild every round.
    """
    values = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    weights = np.array([3, 4, 5], np.float32) / np.float32(12)
    mean = sum(w * values for w in weights)  # what FedAvg's float32 mean gives
    assert (mean != values).sum() > 100  # the problem is real
    reference = {"w": torch.zeros(2), "frozen": torch.from_numpy(values)}
    cfg = _cfg()
    loop = offline_loop(cfg, _FrozenGrid(), reference=reference,
                        checks=UpdateChecks(reference, fl=cfg.fl,
                                            immutable_keys=frozenset({"frozen"})))
    loop.run()
    final = loop.state.arrays
    assert np.array_equal(final["frozen"].numpy(), values)
    # the trained array is the weighted mean: 3 rounds of +(3*1 + 4*2 + 5*3) / 12
    np.testing.assert_allclose(final["w"].numpy(), [3 * 26 / 12] * 2, rtol=1e-6)


class _Journal(_FlakyGrid):
    """A _FlakyGrid that writes each push and pull into a shared journal."""

    def __init__(self, journal: list[str]) -> None:
        super().__init__([])
        self.journal = journal

    def push_messages(self, messages):
        messages = list(messages)
        self.journal.append(f"push {messages[0].metadata.message_type}")
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        self.journal.append("pull")
        return super().pull_messages(message_ids)


class _JournalCallback(Recording):
    def __init__(self, journal: list[str]) -> None:
        super().__init__()
        self.journal = journal

    def on_record(self, state, result, record) -> None:
        self.journal.append(f"record {record['round']}")
        super().on_record(state, result, record)


def test_the_initial_model_is_recorded_while_round_one_trains() -> None:
    # Arrange
    journal: list[str] = []
    recording = _JournalCallback(journal)
    loop = offline_loop(_cfg(), _Journal(journal), reference=REFERENCE, callbacks=[recording])
    # Act
    loop.run()
    # Assert: round 0's record (its central evaluation) comes after round 1's push,
    # before its replies are read; rounds stay in order, the initial model unchanged
    assert journal[:3] == ["push train", "record 0", "pull"]
    assert [r["round"] for r in recording.records] == [0, 1, 2, 3]
    assert recording.results[0].state_dict["w"].tolist() == [0.0, 0.0, 0.0]
    assert recording.results[1].state_dict["w"].tolist() != [0.0, 0.0, 0.0]


def test_the_initial_model_is_recorded_when_no_round_runs() -> None:
    recording = Recording()
    loop = offline_loop(FedimgConfig(rounds=0, clients=3), _FlakyGrid([]),
                        reference=REFERENCE, callbacks=[recording])
    loop.run()
    assert [r["round"] for r in recording.records] == [0]
