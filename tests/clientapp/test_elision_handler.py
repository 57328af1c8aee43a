"""Frozen arrays stay home, through the real train handler and the server's reply filters.

A message without EfficientNet-Lite0's frozen trunk trains the same update, to the bit,
as the message with every array; the reply carries only what the client trains, and
the server's filters put the rest back as sent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedimg.build import initial_model
from fedimg.clientapp import app as client_app
from fedimg.clientapp.environment import environment
from fedimg.config import HeterogeneityConfig, to_json
from fedimg.config.compose import compose_config
from fedimg.data import partition_dataset
from fedimg.errors import UpdateError
from fedimg.serverapp.filters import FilterContext, apply_filters
from fedimg.serverapp.state import RunState, Sampler
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.elision import ELIDED_KEY, Elision
from fedimg.transport.grid import Exchange, content_bytes
from fedimg.transport.packing import pack_content, unpack_content
from fedimg.transport.records import (
    ARRAYS_KEY,
    PARTITION_KEY,
    config_record,
    partitions_record,
    state_dict_to_record,
)

# medical's pretrained Lite0, its last block and head trained on cached trunk features
ARGV = ["clients=2", "data.source=synthetic", "data.image_size=64", "data.partitioner=iid",
        "data.quantity_skew=0", "data.synthetic.train_size=48", "data.min_partition_size=8",
        "train.batch_size=8", "train.lr=0.05", "transfer.mode=last_k", "transfer.last_k=1",
        "data.augment=none", "seed=5"]


def _setup():  # noqa: ANN202
    cfg = compose_config("medical", ARGV)
    env = environment(to_json(cfg), 1)
    start, _, _, frozen = initial_model(cfg, env.num_classes)  # the server's start
    partitions = partition_dataset(env.dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                                   seed=cfg.seed)
    content = RecordDict({"config": config_record(cfg, server_round=1),
                          ARRAYS_KEY: state_dict_to_record(start),
                          PARTITION_KEY: partitions_record(partitions, {1: 0, 2: 1})})
    assert frozen == env.frozen_keys
    elision = Elision({k: start[k].numpy() for k in frozen})
    return env, start, content, elision


def _train(content: RecordDict) -> Message:
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    return client_app.train(message, context)


def test_a_message_without_the_frozen_trunk_trains_the_same_update() -> None:
    # Arrange: the full message and the one that travels (trunk left out, then packed)
    env, start, content, elision = _setup()
    wire = pack_content(elision.elide(content), ARRAYS_KEY)
    frozen = env.frozen_keys
    # Act: lean first, so this worker's model (built without weights) must build them
    lean_reply, full_reply = _train(wire), _train(content)
    # Assert: about 3/4 of Lite0's bytes stay home each way, and the updates are equal
    assert len(frozen) > 200 and content_bytes(wire) < 0.3 * content_bytes(content)
    lean = unpack_content(lean_reply.content)  # packed, as the server packed its own
    sent_back = {k: v.numpy() for k, v in lean[ARRAYS_KEY].items()}
    assert not frozen & set(sent_back)  # only what the client trains comes back
    full = {k: v.numpy() for k, v in full_reply.content[ARRAYS_KEY].items()}
    assert set(full) == set(sent_back)
    for key, value in sent_back.items():
        assert np.array_equal(value, full[key]), key
    # and the server's filters rebuild the whole update, frozen arrays as sent
    sent = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
    e = Exchange(phase=MessageType.TRAIN, partition_id=0, node_id=1, sent=sent,
                 bytes_down=content_bytes(wire), reply=lean_reply,
                 bytes_up=content_bytes(lean_reply.content))
    checks = UpdateChecks(start, fixed_keys=frozen, immutable_keys=frozen)
    state = RunState(arrays=content[ARRAYS_KEY], strategy=None, sampler=Sampler(0))
    apply_filters([e], FilterContext(checks=checks, state=state, hetero=HeterogeneityConfig()))
    assert e.status == "ok", e.reason
    assert set(e.arrays) == set(start)
    assert all(np.array_equal(e.arrays[k], start[k].numpy()) for k in frozen)


def test_a_wrong_digest_is_refused_before_training() -> None:
    # Arrange: the server claims a trunk this client does not hold
    env, start, content, elision = _setup()
    wire = elision.elide(content)
    note = wire[ELIDED_KEY]
    wire[ELIDED_KEY] = ConfigRecord({"keys": note["keys"], "digest": "0" * 64})
    before = {k: v.clone() for k, v in env.model.state_dict().items()}
    # Act / Assert: the message is refused, and the model is as it was
    with pytest.raises(UpdateError, match="fl.elide_frozen=false"):
        _train(wire)
    assert all(torch.equal(v, before[k]) for k, v in env.model.state_dict().items())
