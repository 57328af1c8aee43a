"""FedNova, SCAFFOLD and FedDyn: one round of each against a hand computation.

Two trained numbers ``w`` and one BatchNorm statistic ``bn.running_mean`` (a buffer:
the example-weighted mean in every strategy). Node n is client n - 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from offline_grid import answer

from fedimg.config import FedimgConfig
from fedimg.errors import ConfigError, UpdateError
from fedimg.serverapp.drift_rules import step_norm
from fedimg.serverapp.drift_strategies import FedDyn, FedNova, Scaffold
from fedimg.serverapp.strategies import STRATEGIES, common_kwargs
from fedimg.transport.grid import NodeView
from fedimg.transport.records import (
    GRAD_OFFSET_KEY,
    PROXIMAL_MU_KEY,
    metric_record,
    reply_content,
)

BUFFER = "bn.running_mean"
X = ArrayRecord({"w": Array(np.array([1.0, 2.0], np.float32)),
                 BUFFER: Array(np.array([0.0], np.float32))})


def _kwargs() -> dict:
    return {**common_kwargs(FedimgConfig()), "fixed_keys": {BUFFER}}


def _round(strategy, server_round: int, replies: dict[int, tuple], arrays: ArrayRecord = X
           ) -> tuple[dict[int, Message], ArrayRecord]:
    """Configure for nodes ``replies``; node n answers (w, local steps, examples, buffer)."""
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        server_round, arrays, ConfigRecord(), NodeView(sorted(replies)))}
    answers = []
    for node, (w, steps, n, buf) in replies.items():
        record = ArrayRecord({"w": Array(np.array(w, np.float32)),
                              BUFFER: Array(np.array([buf], np.float32))})
        content = reply_content(metrics=metric_record({"train/steps": steps}, num_examples=n),
                                arrays=record)
        answers.append(answer(messages[node], content))
    new, _ = strategy.aggregate_train(server_round, answers)
    return messages, new


def _w(record: ArrayRecord, key: str = "w") -> list[float]:
    return record[key].numpy().tolist()


def test_fednova_one_round_with_1_3_and_6_local_steps() -> None:
    # Arrange: x = [1, 2]; p = 1/4, 1/4, 1/2 (examples 1, 1, 2); tau = 1, 3, 6; no momentum.
    # Normalised updates d_i = (x - y_i) / tau_i = [.5, 0], [0, .5], [.25, .25]
    strategy = FedNova(**_kwargs(), momentum=0.0)
    replies = {1: ([0.5, 2.0], 1, 1, 0.0), 2: ([1.0, 0.5], 3, 1, 4.0),
               3: ([-0.5, 0.5], 6, 2, 8.0)}
    # Act
    _, new = _round(strategy, 1, replies)
    # Assert: d = .25 [.5, 0] + .25 [0, .5] + .5 [.25, .25] = [.25, .25];
    # tau_eff = .25 * 1 + .25 * 3 + .5 * 6 = 4; x+ = x - 4 d = [0, 1]
    # (FedAvg would give [0.125, 0.875]); the buffer: .25 * 0 + .25 * 4 + .5 * 8 = 5
    assert _w(new) == [0.0, 1.0]
    assert _w(new, BUFFER) == [5.0]


def test_fednova_with_equal_steps_and_no_momentum_is_fedavg() -> None:
    strategy = FedNova(**_kwargs())
    _, new = _round(strategy, 1, {1: ([0.0, 0.0], 4, 1, 0.0), 2: ([3.0, 6.0], 4, 2, 0.0)})
    assert _w(new) == [2.0, 4.0]  # 1/3 [0, 0] + 2/3 [3, 6]


def test_the_momentum_step_norm_is_how_far_torch_sgd_moves() -> None:
    # Arrange: 3 steps of torch's SGD (lr 1, momentum 0.5) on a constant gradient 1
    w = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=1.0, momentum=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        (-w).sum().backward()  # gradient -1: w moves up by the buffer each step
        optimizer.step()
    # Act / Assert: buffers 1, 1.5, 1.75 -> 4.25 = [3 - .5 (1 - .125) / .5] / .5
    assert float(w.detach()) == 4.25 == step_norm(3, 0.5)
    assert step_norm(6) == 6.0


def test_scaffold_one_round_server_and_client_controls() -> None:
    # Arrange: N = 4 clients, clients 0 and 1 train with lr 0.5 for K = 2 and 4 steps.
    strategy = Scaffold(**_kwargs(), num_clients=4, client_lr=lambda r: 0.5)
    strategy.bind_clients(lambda node: node - 1)
    # Act: round 1 (c = c_i = 0): y_0 = [0, 2], y_1 = [1, 0]
    sent, new = _round(strategy, 1, {1: ([0.0, 2.0], 2, 1, 0.0), 2: ([1.0, 0.0], 4, 3, 4.0)})
    # Assert: no offset while every control is 0
    assert all(GRAD_OFFSET_KEY not in m.content for m in sent.values())
    # c_0+ = (x - y_0) / (K lr) = [1, 0] / 1 = [1, 0]; c_1+ = [0, 2] / 2 = [0, 1]
    assert strategy.client_controls[0]["w"].tolist() == [1.0, 0.0]
    assert strategy.client_controls[1]["w"].tolist() == [0.0, 1.0]
    # x+ = x + mean(y_i - x) = [1, 2] + mean([-1, 0], [0, -2]) = [0.5, 1]  (equal weights)
    assert _w(new) == [0.5, 1.0] and _w(new, BUFFER) == [3.0]  # buffer: 1/4 0 + 3/4 4
    # c+ = 0 + (dc_0 + dc_1) / N = [1, 1] / 4
    assert strategy.control["w"].tolist() == [0.25, 0.25]
    assert set(strategy.control) == {"w"}  # no control for the buffer


def test_scaffold_round_two_sends_c_minus_c_i_and_keeps_c_the_mean_of_the_c_i() -> None:
    # Arrange: after round 1 above
    strategy = Scaffold(**_kwargs(), num_clients=4, client_lr=lambda r: 0.5)
    strategy.bind_clients(lambda node: node - 1)
    _, x1 = _round(strategy, 1, {1: ([0.0, 2.0], 2, 1, 0.0), 2: ([1.0, 0.0], 4, 3, 4.0)})
    # Act: round 2 with clients 0 and 2 (K = 2): y_0 = [.5, 0], y_2 = [-.5, 1]
    sent, x2 = _round(strategy, 2, {1: ([0.5, 0.0], 2, 1, 0.0), 3: ([-0.5, 1.0], 2, 1, 0.0)},
                      arrays=x1)
    # Assert: offsets c - c_i = [.25, .25] - [1, 0] and [.25, .25] - 0
    assert _w(sent[1].content[GRAD_OFFSET_KEY]) == [-0.75, 0.25]
    assert _w(sent[3].content[GRAD_OFFSET_KEY]) == [0.25, 0.25]
    # c_0+ = [1, 0] - [.25, .25] + [0, 1] / 1 = [.75, .75]; c_2+ = -[.25, .25] + [1, 0]
    assert strategy.client_controls[0]["w"].tolist() == [0.75, 0.75]
    assert strategy.client_controls[2]["w"].tolist() == [0.75, -0.25]
    # c = mean of all four c_i: ([.75, .75] + [0, 1] + [.75, -.25] + 0) / 4
    assert strategy.control["w"].tolist() == [0.375, 0.375]
    assert _w(x2) == [0.0, 0.5]  # [.5, 1] + mean([0, -1], [-1, 0])


def test_scaffold_option_two_with_momentum_counts_the_momentum_weighted_steps() -> None:
    strategy = Scaffold(**_kwargs(), num_clients=1, client_lr=lambda r: 0.5, momentum=0.5)
    strategy.bind_clients(lambda node: node - 1)
    _round(strategy, 1, {1: ([1.0, -2.25], 3, 1, 0.0)})  # x - y = [0, 4.25]
    assert strategy.client_controls[0]["w"].tolist() == [0.0, 2.0]  # 4.25 / (4.25 * 0.5)


def test_feddyn_one_round() -> None:
    # Arrange: alpha = 0.5, m = 4 clients; clients 0 and 1 return [2, 2] and [1, 4]
    strategy = FedDyn(**_kwargs(), alpha=0.5, num_clients=4)
    strategy.bind_clients(lambda node: node - 1)
    # Act
    sent, new = _round(strategy, 1, {1: ([2.0, 2.0], 1, 1, 0.0), 2: ([1.0, 4.0], 1, 1, 2.0)})
    # Assert: the quadratic term's alpha travels as FedProx's mu; no linear term yet
    assert all(m.content["config"][PROXIMAL_MU_KEY] == 0.5 for m in sent.values())
    assert all(GRAD_OFFSET_KEY not in m.content for m in sent.values())
    # g_k = -alpha (y_k - x): g_0 = -.5 [1, 0], g_1 = -.5 [0, 2]
    assert strategy.client_gradients[0]["w"].tolist() == [-0.5, 0.0]
    assert strategy.client_gradients[1]["w"].tolist() == [0.0, -1.0]
    # h = -alpha / m * sum(y_k - x) = -.125 [1, 2]; x+ = mean y - h / alpha
    assert strategy.h["w"].tolist() == [-0.125, -0.25]
    assert _w(new) == [1.75, 3.5]  # [1.5, 3] + [.25, .5]
    assert _w(new, BUFFER) == [1.0]
    # Round 2: the linear term's offset -g_k
    again = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        2, new, ConfigRecord(), NodeView([1, 3]))}
    assert _w(again[1].content[GRAD_OFFSET_KEY]) == [0.5, 0.0]
    assert GRAD_OFFSET_KEY not in again[3].content


@pytest.mark.parametrize("steps", [0, 2.5, float("nan"), None])
def test_a_reply_without_a_whole_step_count_is_refused_by_its_filter(steps) -> None:
    strategy = FedNova(**_kwargs())
    metrics = {} if steps is None else {"train/steps": steps}
    with pytest.raises(UpdateError, match="whole number of local steps"):
        strategy.check_reply(metrics)
    strategy.check_reply({"train/steps": 3.0})


def test_the_three_are_registered_with_their_facts() -> None:
    specs = {name: STRATEGIES.get(name) for name in ("fednova", "scaffold", "feddyn")}
    assert specs["scaffold"].loss_term and specs["feddyn"].loss_term
    assert not specs["fednova"].loss_term  # server only: it works under DP-SGD
    assert specs["fednova"].sgd_steps and specs["scaffold"].sgd_steps
    assert not any(s.secure_sum or s.averages for s in specs.values())


@pytest.mark.parametrize(("strategy", "override", "message"), [
    ("scaffold", {"privacy": "dp_sgd"}, "drops the term this strategy adds"),
    ("feddyn", {"privacy": "dp_sgd"}, "drops the term this strategy adds"),
    ("scaffold", {"privacy": "client_dp"}, "needs the server to average"),
    ("fednova", {"secure": True}, "it needs each update"),
    ("scaffold", {"optimizer": "adamw"}, "Fix: train.optimizer=sgd"),
    ("fednova", {"optimizer": "adamw"}, "Fix: train.optimizer=sgd"),
    ("feddyn", {"local_bn": True}, "Fix: drop fl.local_bn"),
])
def test_combinations_that_make_no_sense_are_refused_in_one_line(strategy, override,
                                                                 message) -> None:
    from fedimg.resolve import compose_and_check

    overrides = [f"strategy={strategy}", "clients=3", "fl.min_train_clients=3"]
    overrides += {"privacy": [f"privacy={override.get('privacy')}", "transfer.bn=frozen"],
                  "secure": ["fl.secure_aggregation=secaggplus"],
                  "optimizer": [f"train.optimizer={override.get('optimizer')}"],
                  "local_bn": ["fl.local_bn=true"]}[next(iter(override))]
    with pytest.raises(ConfigError, match=message):
        compose_and_check(overrides=overrides)


def test_fednova_is_allowed_under_dp_sgd() -> None:
    # server-side post-processing of the DP-SGD updates; no term in the client's loss
    from fedimg.resolve import compose_and_check

    cfg = compose_and_check(overrides=["strategy=fednova", "privacy=dp_sgd",
                                       "transfer.bn=frozen"])
    assert (cfg.strategy, cfg.privacy.mode) == ("fednova", "dp_sgd")
