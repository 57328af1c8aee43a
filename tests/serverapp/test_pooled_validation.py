"""val/pooled_balanced_accuracy: the clients' per-class validation counts, summed."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

from fedimg.serverapp.round_record import POOLED_METRIC, clients, exchange_summary
from fedimg.training.metrics import class_counts, pooled_balanced_accuracy
from fedimg.transport.grid import Exchange
from fedimg.transport.records import aggregate_metrics, metric_record, split_counts


def _logits(predicted: list[int], classes: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), classes).float()


# Client A: labels 0 0 0 1, predicted 0 0 1 1; client B: labels 1 1, predicted 0 1.
A = class_counts(_logits([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]))
B = class_counts(_logits([0, 1]), torch.tensor([1, 1]))


def _eval(pid: int, counts: dict[str, float], num_examples: int) -> Exchange:
    sent = Message(content=RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=pid + 1)
    return Exchange(phase=MessageType.EVALUATE, partition_id=pid, node_id=pid + 1, sent=sent,
                    metrics={"val/accuracy": 0.5},
                    class_counts={f"val/{k}": v for k, v in counts.items()},
                    bytes_down=0, bytes_up=0, num_examples=num_examples)


def test_counts_and_the_pooled_score_by_hand() -> None:
    assert A == {"count/support/0": 3.0, "count/hits/0": 2.0,
                 "count/support/1": 1.0, "count/hits/1": 1.0}
    assert B == {"count/support/1": 2.0, "count/hits/1": 1.0}
    # Pooled: class 0 2/3, class 1 (1 + 1) / 3 -> 2/3. The mean of each client's own
    # balanced accuracy would be (4 * (2/3 + 1)/2 + 2 * 0.5) / 6 = 0.7222.
    assert pooled_balanced_accuracy([A, B]) == pytest.approx(2 / 3)
    assert pooled_balanced_accuracy([]) != pooled_balanced_accuracy([])  # NaN


def test_the_round_record_sums_the_counts_and_keeps_them_out_of_the_means() -> None:
    exchanges = [_eval(0, A, 4), _eval(1, B, 2)]
    summary = exchange_summary(exchanges, deadline_s=None)
    assert summary[POOLED_METRIC] == pytest.approx(2 / 3)
    assert all("count" not in k for entry in clients(exchanges).values()
               for k in entry["val"])


def test_the_counts_leave_a_reply_before_its_metrics_are_averaged() -> None:
    replies = [Message(RecordDict({"metrics": metric_record(
        {f"val/{k}": v for k, v in c.items()} | {"val/accuracy": 0.5}, num_examples=n)}),
        dst_node_id=1, message_type=MessageType.EVALUATE) for c, n in ((A, 4), (B, 2))]
    counts = [split_counts(reply) for reply in replies]
    assert counts == [{f"val/{k}": v for k, v in c.items()} for c in (A, B)]
    mean = aggregate_metrics([reply.content for reply in replies], "num-examples")
    assert dict(mean) == {"val/accuracy": 0.5}


@pytest.mark.parametrize("bad", [
    {"count/support/1": 2.0, "count/hits/1": 3.0},  # more hits than images
    {"count/support/1": 2.5, "count/hits/1": 1.0},  # not whole
    {"count/support/1": 5.0, "count/hits/1": 1.0},  # not the client's validation size
    {"count/support/1": float("nan"), "count/hits/1": 1.0},
    {"count/support/1": 2.0, "count/hits/0": 1.0},  # hits of a class it does not hold
])
def test_a_client_whose_counts_do_not_add_up_is_left_out(bad, caplog) -> None:
    summary = exchange_summary([_eval(0, A, 4), _eval(1, bad, 2)], deadline_s=None)
    assert summary[POOLED_METRIC] == pytest.approx(pooled_balanced_accuracy([A]))
    assert "client 1: its per-class validation counts do not add up" in caplog.text
