"""Personalised FL (fl.personal): what each client keeps never leaves it.

The real train and evaluate handlers, called with a Context and a Message as a
SuperNode would, for two rounds from the same global model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from client_messages import client_message

from fedimg.clientapp import app as client_app
from fedimg.clientapp.environment import environment
from fedimg.config import to_json
from fedimg.config.compose import compose_config
from fedimg.transport.records import ARRAYS_KEY

TINY = ["clients=2", "data.source=synthetic", "data.image_size=32", "data.partitioner=iid",
        "data.quantity_skew=0", "data.synthetic.train_size=96", "data.min_partition_size=8",
        "train.local_steps=2", "train.batch_size=16", "weights=none", "train.lr=0.05"]
HEAD = ("_fc.weight", "_fc.bias")  # efficientnet_lite0's head (the zoo's ModelSpec.head)


_message = client_message


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content[ARRAYS_KEY].items()}


def _kept(context: Context) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in
            context.state.array_records[client_app.PERSONAL_KEY].items()}


def _two_rounds(personal: str) -> tuple[dict[str, torch.Tensor], list[Message], Context]:
    cfg = compose_config("medical", [*TINY, f"fl.personal={personal}"])
    sent = {k: v.clone() for k, v in environment(to_json(cfg), 1).reference.items()}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                        "num-partitions": 2},
                      state=RecordDict(), run_config={})
    replies = [client_app.train(_message(cfg, sent, r), context) for r in (1, 2)]
    return sent, replies, context


@pytest.mark.parametrize("personal", ["fedper", "fedrep"])
def test_the_personal_head_never_leaves_the_client(personal: str) -> None:
    # Arrange / Act: two rounds from the same global model
    sent, replies, context = _two_rounds(personal)
    kept = _kept(context)
    # Assert: every reply's head is the global head, to the bit; the client keeps a
    # head of its own that trained (it differs from the global one)...
    assert set(kept) == set(HEAD)
    for reply in replies:
        arrays = _arrays(reply)
        for key in HEAD:
            assert np.array_equal(arrays[key], sent[key].numpy())
        # ...and the shared body did train and is sent
        assert not np.array_equal(arrays["_conv_stem.weight"],
                                  sent["_conv_stem.weight"].numpy())
    assert not np.array_equal(kept["_fc.weight"], sent["_fc.weight"].numpy())


def test_dittos_personal_model_never_leaves_the_client() -> None:
    # Arrange / Act
    sent, replies, context = _two_rounds("ditto")
    kept = _kept(context)
    # Assert: the client keeps a whole model v, trained away from the global one...
    assert set(kept) == set(sent)
    assert not np.array_equal(kept["_fc.weight"], sent["_fc.weight"].numpy())
    # ...and no array of any record in any reply is v's (what leaves is w's update)
    for reply in replies:
        for record in reply.content.array_records.values():
            for key, array in record.items():
                if key in kept and kept[key].dtype.kind == "f" and kept[key].size > 1:
                    assert not np.array_equal(array.numpy(), kept[key]), key
        assert set(reply.content.array_records) == {ARRAYS_KEY}


@pytest.mark.parametrize("personal", ["fedper", "ditto"])
def test_a_client_reports_its_personal_model_beside_the_global_one(personal: str) -> None:
    # Arrange: one round trained, then the evaluation message with the global model
    sent, _, context = _two_rounds(personal)
    cfg = compose_config("medical", [*TINY, f"fl.personal={personal}"])
    # Act
    reply = client_app.evaluate(_message(cfg, sent, 2, MessageType.EVALUATE), context)
    # Assert: both models' metrics, and they differ (the kept part trained)
    metrics = dict(reply.content["metrics"])
    assert {"val/accuracy", "val/loss", "val/personal_accuracy", "val/personal_loss"} <= set(
        metrics)
    assert metrics["val/personal_loss"] != metrics["val/loss"]
    assert ARRAYS_KEY not in reply.content.array_records
