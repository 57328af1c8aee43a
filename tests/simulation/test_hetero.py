"""Heterogeneous devices (hetero.*) through the real ClientApp, round loop and FedAvg.

An offline, dropping or late client really does not contribute: the aggregate is
the weighted mean of the other clients' updates only, and each absence is recorded
with its own status.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from offline_grid import OfflineGrid, offline_loop

from fedimg.simulation import fleet
from fedimg.config.compose import compose_config
from fedimg.config import to_json
from fedimg.clientapp import app as client_app
from fedimg.data import partition_dataset
from fedimg.serverapp.round_record import counts, device_time
from fedimg.transport.grid import Exchange
from fedimg.transport.records import (
    ARRAYS_KEY,
    PARTITION_KEY,
    config_record,
    partitions_record,
    state_dict_to_record,
)
from fedimg.clientapp.environment import environment

TINY = ["clients=6", "data.source=synthetic", "data.image_size=32", "data.partitioner=iid",
        "data.quantity_skew=0", "data.synthetic.train_size=192", "data.min_partition_size=8",
        "train.local_steps=2", "train.batch_size=16", "weights=none", "fl.min_replies=1",
        "fl.on_too_few=skip", "fl.min_train_clients=6", "fl.fraction_evaluate=0"]
KEY = "_fc.weight"  # the classifier head: trained, float


class _InProcessGrid(OfflineGrid):
    """Nodes 1..6 = partitions 0..5, each answered by the real ``client_app.train``.

    An exception becomes an error reply carrying its text, as Flower's Ray backend
    sends it (an absent device replies with an error itself); ``silent`` nodes never
    reply (a device that missed a real deadline).
    """

    def __init__(self, silent: frozenset[int] = frozenset()) -> None:
        self.node_ids = list(range(1, 7))
        self.silent = silent
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={
            "partition-id": n - 1, "num-partitions": 6}, state=RecordDict(), run_config={})
            for n in self.node_ids}
        self.updates: dict[int, np.ndarray] = {}  # partition -> head weights it sent

    def send_and_receive(self, messages, *, timeout=None) -> Iterable[Message]:
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.silent:
                continue
            try:
                reply = client_app.train(m, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - what Flower does with it
                reply = m.create_error_reply(Error(code=0, reason=(
                    f"Exception ClientAppException occurred. Message: {exc}")))
            if not reply.has_error():  # absent devices answer with an error reply
                self.updates[node - 1] = np.array(reply.content[ARRAYS_KEY][KEY].numpy())
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _partitions(cfg) -> dict:
    """The run context the server sends: every client's partition (fedimg.build)."""
    env = environment(to_json(cfg), 1)
    return {PARTITION_KEY: partitions_record(partition_dataset(
        env.dataset.train, cfg=cfg.data, num_clients=cfg.clients, seed=cfg.seed))}


def _round(overrides: list[str], silent: frozenset[int] = frozenset()):
    """Training round 1 of the real round loop over six in-process ClientApps."""
    cfg = compose_config("medical", [*TINY, *overrides])
    env = environment(to_json(cfg), 1)
    grid = _InProcessGrid(silent)
    loop = offline_loop(cfg, grid, reference=env.reference, context=_partitions(cfg),
                        train_config=config_record(cfg))
    result = loop.train(1, loop.state.sampler.for_round(1))
    return grid, result, loop.state.arrays


def _expected_mean(grid: _InProcessGrid, exchanges: list[Exchange],
                   used: list[int]) -> np.ndarray:
    sizes = {e.partition_id: e.num_examples for e in exchanges}
    total = sum(sizes[p] for p in used)
    return sum(grid.updates[p].astype(np.float64) * sizes[p] / total for p in used)


def test_offline_dropped_and_late_clients_do_not_contribute() -> None:
    # Client 5 computes 10^6 times slower than this host: past any deadline.
    overrides = ["hetero.availability=0.6", "hetero.dropout=0.4", "seed=4",
                 "hetero.speed_factors=[1,1,1,1,1,1000000]", "hetero.deadline_s=1000"]
    cfg = compose_config("medical", [*TINY, *overrides])
    draws = [fleet.conditions(cfg, 1, pid) for pid in range(6)]
    want = ["offline" if not c.online else "dropped" if c.drop_after is not None
            else "straggler" if pid == 5 else "ok" for pid, c in enumerate(draws)]
    assert {"offline", "dropped", "ok"} <= set(want), want  # seed 4 shows each kind
    # Act
    grid, result, arrays = _round(overrides)
    # Assert: each client's recorded status is what its device did.
    status = {e.partition_id: e.status for e in result.exchanges}
    assert [status[p] for p in range(6)] == want
    used = [p for p in range(6) if want[p] == "ok"]
    assert not result.skipped
    np.testing.assert_allclose(arrays[KEY].numpy(), _expected_mean(grid, result.exchanges, used),
                               rtol=1e-5, atol=1e-6)
    got = counts(result.exchanges)
    assert got["fleet/sampled"] == 6 and got["fleet/ok"] == len(used)
    assert got["fleet/offline"] == want.count("offline")
    assert got["fleet/dropped"] == want.count("dropped")
    # A dropped client ran some of its steps but sent nothing; an offline one ran none.
    assert set(grid.updates) == {p for p in range(6) if want[p] in ("ok", "straggler")}
    assert device_time(result.exchanges, 1000.0) == {"fleet/round_s": 1000.0}


def test_without_heterogeneity_every_client_contributes() -> None:
    grid, result, arrays = _round([])
    assert [e.status for e in result.exchanges] == ["ok"] * 6
    np.testing.assert_allclose(arrays[KEY].numpy(),
                               _expected_mean(grid, result.exchanges, list(range(6))),
                               rtol=1e-5, atol=1e-6)
    assert "fleet/device_s" not in result.exchanges[0].metrics


def test_a_real_deadline_cuts_off_a_client_that_never_replies() -> None:
    # clock=real: the server waits hetero.deadline_s, not fl.timeout_s; the missing
    # reply is a straggler and the aggregate is the others' mean.
    overrides = ["hetero.clock=real", "hetero.deadline_s=0.5"]
    grid, result, arrays = _round(overrides, silent=frozenset({3}))
    status = {e.partition_id: e.status for e in result.exchanges}
    assert status[2] == "straggler" and "deadline" in next(
        e.reason for e in result.exchanges if e.partition_id == 2)
    used = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(arrays[KEY].numpy(), _expected_mean(grid, result.exchanges, used),
                               rtol=1e-5, atol=1e-6)


def test_device_time_is_reported_with_links_and_speed() -> None:
    overrides = ["hetero.speed_factors=[2,2,2,2,2,3]", "hetero.uplink_mbps=8",
                 "hetero.downlink_mbps=16", "hetero.step_s=0.25"]
    _, result, _ = _round(overrides)
    for e in result.exchanges:
        # bytes on the wire: the model down and up, 8 bits / (16e6 or 8e6) per byte;
        # compute: 2 local steps x 0.25 s x the client's speed factor
        speed = 3.0 if e.partition_id == 5 else 2.0
        link = e.bytes_down * 8 / 16e6 + e.bytes_up * 8 / 8e6
        assert e.metrics["fleet/speed"] == speed
        assert e.metrics["fleet/device_s"] == pytest.approx(link + 2 * 0.25 * speed)
        assert e.metrics["fleet/compute_s"] > 0  # what this host measured, for reference
    assert device_time(result.exchanges, None)["fleet/round_s"] == max(
        x.metrics["fleet/device_s"] for x in result.exchanges)


def test_personalization_reports_accuracy_after_k_steps_and_keeps_the_global_model() -> None:
    cfg = compose_config("medical", [*TINY, "fl.personalize_steps=3"])
    env = environment(to_json(cfg), 1)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                        "num-partitions": 6},
                      state=RecordDict(), run_config={})
    content = RecordDict({"config": config_record(cfg, server_round=1),
                          ARRAYS_KEY: state_dict_to_record(env.reference), **_partitions(cfg)})
    first = client_app.evaluate(Message(content=content, message_type="evaluate",
                                        dst_node_id=1), context)
    again = client_app.evaluate(Message(content=content, message_type="evaluate",
                                        dst_node_id=1), context)
    m1, m2 = first.content["metrics"], again.content["metrics"]
    assert {"val/personal_accuracy", "val/personal_loss", "val/accuracy"} <= set(m1)
    assert m1["val/personal_loss"] != m1["val/loss"]  # 3 local steps changed the model
    assert m2["val/loss"] == m1["val/loss"]  # the next message evaluates the global model


@pytest.mark.parametrize("override, message", [
    ("hetero.availability=0", "hetero.availability=0"),
    ("hetero.dropout=1", "hetero.dropout=1"),
    ("hetero.speed_factors=[1,2]", "needs 6 positive values"),
    ("hetero.clock=wall", "valid: simulated, real"),
    ("hetero.deadline_s=-1", "hetero.deadline_s=-1"),
    ("fl.personalize_steps=-2", "fl.personalize_steps=-2"),
    ("hetero.step_s=0", "hetero.step_s=0"),
    ("hetero.speed_factors=[1,1,1,1,1,inf]", "needs 6 positive values"),
])
def test_impossible_heterogeneity_is_refused_before_round_1(override: str, message: str) -> None:
    from fedimg.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        compose_config("medical", [*TINY, override])


@pytest.mark.parametrize("overrides, message", [
    (["privacy=client_dp", "hetero.availability=0.9"], "every sampled client replied"),
    (["privacy=dp_sgd", "fl.personalize_steps=3"], "outside DP-SGD"),
    (["privacy=dp_sgd", "hetero.clock=real", "hetero.deadline_s=5"], "spent budget"),
    (["hetero.clock=real", "hetero.deadline_s=7200"], "must be below fl.timeout_s"),
])
def test_heterogeneity_that_would_break_another_feature_is_refused(overrides: list[str],
                                                                  message: str) -> None:
    # What a privacy mode's registry entry says is checked by the composition root.
    from fedimg.errors import ConfigError
    from fedimg.resolve import compose_and_check

    with pytest.raises(ConfigError, match=message):
        compose_and_check("medical", [*TINY, *overrides])
