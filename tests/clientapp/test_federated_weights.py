"""A client under train.class_weighting=federated: the server's counts, checked, then used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

from client_messages import client_message

from fedimg.clientapp import app as client_app
from fedimg.clientapp.environment import environment
from fedimg.config import to_json
from fedimg.config.compose import compose_config
from fedimg.data import partition_dataset
from fedimg.errors import DataError, UpdateError
from fedimg.training.losses import balanced_weights_from_counts
from fedimg.transport.records import (
    CLASS_COUNTS_KEY,
    config_record,
    counts_from_record,
    counts_record,
)

TINY = ["clients=2", "data.source=synthetic", "data.image_size=32", "data.partitioner=iid",
        "data.quantity_skew=0", "data.synthetic.train_size=96", "data.min_partition_size=8",
        "train.local_steps=1", "train.batch_size=16", "weights=none"]


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def _install_partitions(env) -> None:
    """The server's partitions, as the first message installs them."""
    env.install_partitions(partition_dataset(env.dataset.train, cfg=env.cfg.data,
                                             num_clients=env.cfg.clients, seed=env.cfg.seed))


def _message(cfg, env, counts: np.ndarray | ArrayRecord | None):
    msg = client_message(cfg, env.reference, 1)
    if counts is not None:
        msg.content[CLASS_COUNTS_KEY] = (counts if isinstance(counts, ArrayRecord)
                                         else counts_record(counts))
    return msg


@pytest.fixture(scope="module")
def federated():
    cfg = compose_config("medical", [*TINY, "train.class_weighting=federated", "seed=7"])
    return cfg, environment(to_json(cfg), 1)


def test_every_client_weighs_by_the_federations_counts_not_its_own(federated) -> None:
    # Arrange: the union's counts, as the server sums them
    cfg, env = federated
    _install_partitions(env)
    union = env.own_class_counts()
    # Act
    reply = client_app.train(_message(cfg, env, union), _context())
    # Assert: both clients got the union's balanced weights n / (K n_c)
    assert not reply.has_error()
    expected = balanced_weights_from_counts(torch.as_tensor(union)).float()
    for pid in (0, 1):
        torch.testing.assert_close(env.client(pid).class_weights, expected)
    own = torch.bincount(env.dataset.train.labels[env.partitions[0].train_indices],
                         minlength=env.num_classes)
    assert not torch.allclose(balanced_weights_from_counts(own).float(), expected)
    # A later message may not change them
    with pytest.raises(UpdateError, match="class counts changed during the run"):
        client_app.train(_message(cfg, env, union + 1), _context())


def test_counts_below_the_clients_own_images_are_rejected() -> None:
    cfg = compose_config("medical", [*TINY, "train.class_weighting=federated", "seed=8"])
    env = environment(to_json(cfg), 1)
    _install_partitions(env)
    low = env.own_class_counts() - 1
    with pytest.raises(UpdateError, match="below this client's own images"):
        client_app.train(_message(cfg, env, low), _context())


@pytest.mark.parametrize(("record", "says"), [
    (ArrayRecord({"counts": Array(np.array([1.0, 2.0]))}), "dtype float64"),
    (ArrayRecord({"counts": Array(np.array([5]))}), r"shape \(1,\)"),
    (ArrayRecord({"weights": Array(np.array([5, 5]))}), "malformed"),
])
def test_a_malformed_counts_record_is_a_rejected_message(record, says) -> None:
    cfg = compose_config("medical", [*TINY, "train.class_weighting=federated", "seed=9"])
    env = environment(to_json(cfg), 1)
    with pytest.raises(UpdateError, match=f"rejected the server's class counts: .*{says}"):
        client_app.train(_message(cfg, env, record), _context())


def test_no_counts_from_the_server_names_the_fix() -> None:
    cfg = compose_config("medical", [*TINY, "train.class_weighting=federated", "seed=10"])
    env = environment(to_json(cfg), 1)
    with pytest.raises(DataError, match="sent no class counts.*Fix: "):
        client_app.train(_message(cfg, env, None), _context())


def test_a_deployed_site_reports_its_class_counts_only_when_asked(tmp_path) -> None:
    # Arrange: a site with 5 images of one class and 9 of the other
    from PIL import Image

    for name, n in (("benign", 5), ("malignant", 9)):
        (tmp_path / "site" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 12), (40 * i, len(name), 0)).save(
                tmp_path / "site" / name / f"{i}.png")
    node = {"site": "hospital_a", "data-path": str(tmp_path / "site"), "device": "cpu",
            "min-samples": 4}
    run = ["deploy.enabled=true", "data.dataset=folder", f"data.path={tmp_path / 'c'}",
           "data.classes=[benign,malignant]", "data.image_size=16", "weights=none"]
    replies = {}
    for weighting in ("balanced", "federated"):
        cfg = compose_config("medical", [*run, f"train.class_weighting={weighting}"])
        query = Message(RecordDict({"config": config_record(cfg)}),
                        message_type=MessageType.QUERY, dst_node_id=1)
        # Act
        replies[weighting] = client_app.describe(query, Context(
            run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})).content
    # Assert: counts of its training split only, adding up to its reported size
    assert CLASS_COUNTS_KEY not in replies["balanced"].array_records
    reply = replies["federated"]
    counts = counts_from_record(reply, num_classes=2)
    assert counts.sum() == reply["metrics"]["num-train"] and counts.sum() < 14
    assert (counts > 0).all()
