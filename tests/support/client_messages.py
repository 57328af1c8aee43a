"""A simulated client's message, as the server builds it: config, global weights, partitions.

Used by the tests that drive the real ClientApp handlers in-process (FedBN, personal
FL): ``client_message(cfg, state, server_round)`` then ``client_app.train(msg, context)``.
"""

from __future__ import annotations

import torch
from flwr.app import Message, MessageType, RecordDict

from fedimg.clientapp.environment import environment
from fedimg.config import FedimgConfig, to_json
from fedimg.data import partition_dataset
from fedimg.transport.records import (
    ARRAYS_KEY,
    PARTITION_KEY,
    config_record,
    partitions_record,
    state_dict_to_record,
)


def client_message(cfg: FedimgConfig, global_state: dict[str, torch.Tensor],
                   server_round: int, kind: str = MessageType.TRAIN) -> Message:
    """A ``kind`` message to node 1 carrying ``global_state`` and every client's partition."""
    env = environment(to_json(cfg), 1)
    partitions = partition_dataset(env.dataset.train, cfg=cfg.data, num_clients=cfg.clients,
                                   seed=cfg.seed)  # as the server's messages carry them
    content = RecordDict({"config": config_record(cfg, server_round=server_round),
                          ARRAYS_KEY: state_dict_to_record(global_state),
                          PARTITION_KEY: partitions_record(partitions)})
    return Message(content=content, message_type=kind, dst_node_id=1)
