"""A cohort message through the real train handler equals its members' lone messages.

The server's own :func:`fedimg.serverapp.cohorts.group` merges the lone messages into
one, the ClientApp's train handler answers it, :func:`~fedimg.serverapp.cohorts.split`
takes each member's reply back out; each must equal the reply of that client's lone
message, to the tolerances of ``tests/training/test_vectorized.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from fedimg.clientapp import app as client_app
from fedimg.clientapp.environment import environment
from fedimg.config import to_json
from fedimg.config.compose import compose_config
from fedimg.data import partition_dataset
from fedimg.serverapp.cohorts import group, split
from fedimg.simulation import fleet
from fedimg.training.vector_rule import VectorizeRule
from fedimg.transport.grid import Exchange, content_bytes
from fedimg.transport.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    config_record,
    partitions_record,
    state_dict_to_record,
)

# medical: pretrained EfficientNet-Lite0, light augmentation, balanced class weights
TINY = ["clients=4", "data.source=synthetic", "data.image_size=64", "data.partitioner=iid",
        "data.quantity_skew=0", "data.synthetic.train_size=96", "data.min_partition_size=8",
        "train.batch_size=8", "train.lr=0.05"]
# the last 2 blocks (their BatchNorm in train mode) and the head on images, 3 steps
LAST_K = ["transfer.mode=last_k", "transfer.last_k=2", "transfer.bn=train",
          "train.feature_cache=off"]
TAIL = ["transfer.mode=last_k", "transfer.last_k=1", "data.augment=none"]  # cached trunk
# Not every layer: with BatchNorm over batches of 8 small maps, one plain step of the
# full model already differs by 6e-3 in the stem's weights between 1 and 2 threads
# (measured at 64 px), so no two paths can agree to float tolerance there. (At 32 px
# even LAST_K's head BatchNorm, over 1x1 maps, differs by 1e-3 between thread counts
# after 3 steps; at 64 px by 1e-5, and vectorised vs one by one by 1e-7.)
MEMBERS = [0, 1, 2]  # nodes 1, 2, 3


def _global(cfg) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The global model of the test: a copy (the environment's reference shares the
    live model's CPU tensors, which every round of training moves)."""
    return {k: v.clone() for k, v in environment(to_json(cfg), 1).reference.items()}


def _messages(cfg, start: dict[str, torch.Tensor]) -> list[Message]:  # noqa: ANN001
    """Round 1's training messages to nodes 1..4, one shared content (as the server's)."""
    env = environment(to_json(cfg), 1)
    partitions = partition_dataset(env.dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                                   seed=cfg.seed)
    book = {p + 1: p for p in range(cfg.clients)}  # the address book: node -> client
    content = RecordDict({"config": config_record(cfg, server_round=1),
                          ARRAYS_KEY: state_dict_to_record(start),
                          PARTITION_KEY: partitions_record(partitions, book)})
    return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=p + 1)
            for p in range(cfg.clients)]


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={"partition-id": node - 1,
                                                        "num-partitions": 4},
                   state=RecordDict(), run_config={})


def _cohort_replies(cfg, start: dict[str, torch.Tensor],  # noqa: ANN001
                    members: list[int]) -> list[Message]:
    """Each member's reply to one cohort message, split out as the server does."""
    lone = [m for m in _messages(cfg, start) if m.metadata.dst_node_id - 1 in members]
    grouping = group(lone, len(members), partition_of=lambda n: n - 1)
    (cohort,) = grouping.messages
    reply = client_app.train(cohort, _context(cohort.metadata.dst_node_id))
    sent = Exchange(phase=MessageType.TRAIN, partition_id=members[0], node_id=members[0] + 1,
                    sent=cohort, bytes_down=content_bytes(cohort.content), reply=reply)
    return [e.reply for e in split([sent], grouping)]


def _lone_replies(cfg, start: dict[str, torch.Tensor],  # noqa: ANN001
                  members: list[int]) -> list[Message]:
    messages = _messages(cfg, start)
    return [client_app.train(messages[p], _context(p + 1)) for p in members]


def _assert_same_update(got: Message, want: Message) -> None:
    """Same arrays (parameters 1e-5; BatchNorm statistics 1e-5 of their scale), same metrics."""
    arrays, expected = got.content[ARRAYS_KEY], want.content[ARRAYS_KEY]
    assert list(arrays.keys()) == list(expected.keys())
    for name in expected.keys():
        a, b = arrays[name].numpy().astype(np.float64), expected[name].numpy().astype(np.float64)
        scale = max(1.0, np.abs(b).max()) if "running" in name else 1.0
        assert np.abs(a - b).max() <= 1e-5 * scale, name
    metrics, lone = got.content[METRICS_KEY], want.content[METRICS_KEY]
    assert set(metrics.keys()) == set(lone.keys())
    for key in lone.keys():
        if key.endswith("seconds") or key == "fleet/compute_s":
            continue  # wall time on this host
        assert metrics[key] == pytest.approx(lone[key], abs=1e-5), key


@pytest.mark.parametrize("part", [LAST_K, TAIL], ids=["last_k", "cached_tail"])
@pytest.mark.parametrize("margin", [0.0, float("inf")], ids=["vectorised", "one_by_one"])
def test_each_member_of_a_cohort_gets_its_lone_update(part, margin):
    # Arrange: the rule forced to one path (margin 0: vectorise always; inf: never)
    cfg = compose_config("medical", [*TINY, *part])
    env = environment(to_json(cfg), 1)
    env.__dict__["vectorize_rule"] = VectorizeRule(margin=margin)
    start = _global(cfg)
    lone = _lone_replies(cfg, start, MEMBERS)

    # Act
    members = _cohort_replies(cfg, start, MEMBERS)

    # Assert: 3 replies, each its client's lone one (22 images: batches of 8, 8, 6)
    assert (env.trunk_cache.plan.train and env.trunk_cache.split is not None) == (part == TAIL)
    assert [m.metadata.src_node_id for m in members] == [1, 2, 3]
    for got, want in zip(members, lone, strict=True):
        assert not got.has_error()
        assert got.content[METRICS_KEY]["train/steps"] == 3
        _assert_same_update(got, want)


def test_an_offline_member_answers_as_an_offline_client():
    # Arrange: half the devices online, a fixed 10 ms per step (device time is reproducible)
    cfg = compose_config("medical", [*TINY, *LAST_K, "hetero.availability=0.5",
                                     "hetero.step_s=0.01", "hetero.uplink_mbps=8", "seed=2"])
    online = [fleet.conditions(cfg, 1, p).online for p in range(4)]
    assert online == [True, False, True, False]  # the seeded draw (seed 2) has both kinds
    start = _global(cfg)
    lone = _lone_replies(cfg, start, [0, 1, 2, 3])

    # Act
    members = _cohort_replies(cfg, start, [0, 1, 2, 3])

    # Assert: the offline ones fail with the absent code and the same reason; the online
    # ones train to the same update, with the same simulated device time
    for is_online, got, want in zip(online, members, lone, strict=True):
        assert got.has_error() == want.has_error() == (not is_online)
        if is_online:
            _assert_same_update(got, want)
            assert got.content[METRICS_KEY]["fleet/device_s"] > 0
        else:
            assert got.error.code == want.error.code == fleet.ABSENT_CODE
            assert got.error.reason == want.error.reason
