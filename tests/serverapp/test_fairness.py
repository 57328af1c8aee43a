"""Client-level fairness of a round: worst, 10th percentile, spread and std of val accuracy."""

from __future__ import annotations

import pytest

from fedimg.transport.grid import ClientExchange
from fedimg.serverapp.callbacks import fairness


def _eval(pid: int, accuracy: float, status: str = "ok") -> ClientExchange:
    return ClientExchange(phase="evaluate", partition_id=pid, node_id=pid, bytes_down=0,
                          metrics={"val/accuracy": accuracy}, status=status)


def test_fairness_figures_by_hand() -> None:
    # Arrange: four clients; a failed one and a training exchange must not count.
    exchanges = [_eval(0, 0.9), _eval(1, 0.5), _eval(2, 0.7), _eval(3, 0.8),
                 _eval(4, 0.0, status="failed"),
                 ClientExchange(phase="train", partition_id=5, node_id=5, bytes_down=0,
                                metrics={"val/accuracy": 0.1})]
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
