"""FedBN (fl.local_bn): each client keeps its own BatchNorm across rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from client_messages import client_message

from fedimg.config.compose import compose_config
from fedimg.config import to_json
from fedimg.errors import ConfigError
from fedimg.clientapp import app as client_app
from fedimg.transport.records import ARRAYS_KEY
from fedimg.clientapp.environment import environment

TINY = ["clients=2", "data.source=synthetic", "data.image_size=32", "data.partitioner=iid",
        "data.quantity_skew=0", "data.synthetic.train_size=96", "data.min_partition_size=8",
        "train.local_steps=2", "train.batch_size=16", "weights=none"]
STAT = "_bn0.running_mean"  # the stem's BatchNorm statistics


def _round(cfg, global_state: dict[str, torch.Tensor], context: Context,
           server_round: int) -> dict[str, np.ndarray]:
    reply = client_app.train(client_message(cfg, global_state, server_round), context)
    return {k: v.numpy() for k, v in reply.content[ARRAYS_KEY].items()}


@pytest.mark.parametrize("local_bn", [True, False])
def test_a_client_trains_from_its_own_batchnorm_not_the_servers(local_bn: bool) -> None:
    # Arrange: round 1 from the initial model; then a global model whose stem BatchNorm
    # mean is absurd (100), as a federation of other feature distributions might send.
    cfg = compose_config("medical", [*TINY, f"fl.local_bn={str(local_bn).lower()}"])
    env = environment(to_json(cfg), 1)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                        "num-partitions": 2},
                      state=RecordDict(), run_config={})
    first = _round(cfg, env.reference, context, 1)
    foreign = {k: v.clone() for k, v in env.reference.items()}
    foreign[STAT] = torch.full_like(foreign[STAT], 100.0)
    # Act
    second = _round(cfg, foreign, context, 2)
    # Assert: BatchNorm's running mean moves by momentum 0.1 per step from where it
    # starts; 2 steps keep 0.9^2 = 81% of the start (81 if it started from 100).
    if local_bn:
        assert np.abs(second[STAT]).max() < 10.0
        assert "fedimg-local-bn" in context.state.array_records
        assert not np.array_equal(second[STAT], first[STAT])  # it kept training locally
    else:
        assert second[STAT].min() > 75.0
    # Every other array starts from the server's model in both cases.
    assert env.batchnorm_keys and STAT in env.batchnorm_keys


def test_local_batchnorm_needs_trainable_batchnorm() -> None:
    with pytest.raises(ConfigError, match="fl.local_bn=true"):
        compose_config("medical", ["fl.local_bn=true", "transfer.bn=frozen"])
