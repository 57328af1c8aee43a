"""What a round record says about the clients: fairness, device time, counts, entries."""

from __future__ import annotations

import pytest
from flwr.app import Message, MessageType, RecordDict

from fedimg.serverapp.round_record import clients, counts, device_time, exchange_summary, fairness
from fedimg.transport.grid import Exchange


def _exchange(pid: int, phase: str = MessageType.EVALUATE, status: str = "ok", *,
              bytes_down: int = 0, bytes_up: int = 0, reason: str = "", **metrics) -> Exchange:
    sent = Message(content=RecordDict(), message_type=phase, dst_node_id=pid + 1)
    return Exchange(phase=phase, partition_id=pid, node_id=pid + 1, sent=sent,
                    bytes_down=bytes_down, bytes_up=bytes_up, metrics=dict(metrics),
                    status=status, reason=reason)


def _eval(pid: int, accuracy: float, status: str = "ok") -> Exchange:
    return _exchange(pid, status=status, **{"val/accuracy": accuracy})


def test_fairness_figures_by_hand() -> None:
    # Arrange: four clients; a failed one and a training exchange must not count.
    exchanges = [_eval(0, 0.9), _eval(1, 0.5), _eval(2, 0.7), _eval(3, 0.8),
                 _eval(4, 0.0, status="failed"),
                 _exchange(5, MessageType.TRAIN, **{"val/accuracy": 0.1})]
    # Act
    fair = fairness(exchanges)
    # Assert: sorted 0.5 0.7 0.8 0.9; p10 at index 0.1 * 3 = 0.3 -> 0.5 + 0.3 * 0.2 = 0.56;
    # mean 0.725, variance (0.0506 + 0.0006 + 0.0056 + 0.0306) / 4 = 0.021875.
    assert fair["fair/worst_accuracy"] == 0.5
    assert fair["fair/p10_accuracy"] == pytest.approx(0.56)
    assert fair["fair/spread_accuracy"] == pytest.approx(0.4)
    assert fair["fair/std_accuracy"] == pytest.approx(0.021875 ** 0.5)


def test_no_evaluation_gives_no_fairness_figures() -> None:
    assert fairness([_eval(0, float("nan"))]) == {}
    assert fairness([]) == {}


def test_other_metrics_are_named_after_themselves() -> None:
    fair = fairness([_exchange(0, **{"val/personal_accuracy": 0.6}),
                     _exchange(1, **{"val/personal_accuracy": 0.8})], "val/personal_accuracy")
    assert fair["fair/worst_personal_accuracy"] == 0.6
    assert fair["fair/spread_personal_accuracy"] == pytest.approx(0.2)


def test_device_time_is_the_slowest_used_reply_or_the_deadline() -> None:
    train = MessageType.TRAIN
    used = [_exchange(0, train, **{"fleet/device_s": 2.0}),
            _exchange(1, train, **{"fleet/device_s": 5.0})]
    assert device_time(used, None) == {"fleet/round_s": 5.0}
    # A round that lost a straggler lasted until the 8 s deadline.
    late = _exchange(2, train, "straggler", **{"fleet/device_s": 9.0})
    assert device_time([*used, late], 8.0) == {"fleet/round_s": 8.0}
    assert device_time([_exchange(0, train)], None) == {}  # heterogeneity off


def test_counts_by_status_and_phase() -> None:
    # Arrange: 5 training exchanges (2 ok, offline, timeout, rejected) and 2 evaluations
    # (failed, declined).
    train = MessageType.TRAIN
    exchanges = [_exchange(0, train), _exchange(1, train), _exchange(2, train, "offline"),
                 _exchange(3, train, "timeout"), _exchange(4, train, "rejected"),
                 _exchange(0, status="failed"), _exchange(1, status="declined")]
    # Act
    got = counts(exchanges)
    # Assert: sampled, ok and absences count training only; failed (timeout + failed),
    # rejected and declined count both phases.
    assert got == {"fleet/sampled": 5, "fleet/ok": 2, "fleet/failed": 2,
                   "fleet/rejected": 1, "fleet/declined": 1, "fleet/offline": 1,
                   "fleet/dropped": 0, "fleet/straggler": 0}


def test_client_entries_add_bytes_and_keep_the_attempt_that_counted() -> None:
    # Arrange: client 0's first attempt was discarded, its retry aggregated.
    train = MessageType.TRAIN
    first = _exchange(0, train, "discarded", bytes_down=100, bytes_up=40, reason="attempt 1")
    retry = _exchange(0, train, bytes_down=100, bytes_up=40, **{"train/loss": 0.5})
    retry.num_examples, retry.update_norm = 12, 2.0
    evaluated = _exchange(0, bytes_down=100, **{"val/accuracy": 0.75})
    # Act
    entry = clients([first, retry, evaluated])["0"]
    summary = exchange_summary([first, retry, evaluated], deadline_s=None)
    # Assert
    assert (entry["bytes/down"], entry["bytes/up"]) == (300, 80)
    assert entry["train"] == {"train/loss": 0.5, "num_examples": 12}
    assert entry["val"] == {"val/accuracy": 0.75, "num_examples": 0}
    assert entry["update_norm"] == 2.0 and "train_status" not in entry
    assert (summary["bytes/down"], summary["bytes/up"]) == (300, 80)
    assert summary["fleet/sampled"] == 2 and summary["clients"]["0"] == entry
