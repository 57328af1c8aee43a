"""An in-process federation for secure-aggregation tests: Flower mods, no network.

:class:`ModGrid` delivers each message to its node's ``Context`` through fedimg's real
client filter (:func:`fedimg.clientapp.secure.secure_aggregation_mod`), whose training
handler is scripted: node n answers ``updates[n]`` (its weights and example count).
``kill_at`` drops a node from a stage on; every message the server receives is kept in
``received``, as an eavesdropping server would see it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fedimg.clientapp.secure import secure_aggregation_mod
from fedimg.transport.packing import unpack_content
from fedimg.transport.records import SECAGG_KEY, metric_record, reply_content
from tests.support.offline_grid import OfflineGrid, answer


class ModGrid(OfflineGrid):
    """Nodes 1..n whose training replies are ``updates[node] = (weights, examples)``."""

    def __init__(self, updates: dict[int, tuple[dict[str, np.ndarray], int]], *,
                 kill_at: dict[int, str] | None = None) -> None:
        self.node_ids = sorted(updates)
        self.updates, self.kill_at = updates, dict(kill_at or {})
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in self.node_ids}
        self.received: list[Message] = []
        self.trained: list[int] = []

    def _train(self, msg: Message, context: Context) -> Message:
        weights, examples = self.updates[msg.metadata.dst_node_id]
        self.trained.append(msg.metadata.dst_node_id)
        content = reply_content(metrics=metric_record({"train/loss": float(examples)},
                                                      num_examples=examples),
                                arrays=ArrayRecord({k: Array(np.asarray(v))
                                                    for k, v in weights.items()}))
        return Message(content, reply_to=msg)

    def _dead(self, msg: Message) -> bool:
        stage = msg.content.config_records[SECAGG_KEY]["stage"] \
            if SECAGG_KEY in msg.content.config_records else "train"
        order = ["setup", "share_keys", "collect", "unmask"]
        at = self.kill_at.get(msg.metadata.dst_node_id)
        return at is not None and stage in order and order.index(stage) >= order.index(at)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            if self._dead(msg):
                continue
            msg = Message(unpack_content(msg.content), dst_node_id=msg.metadata.dst_node_id,
                          message_type=msg.metadata.message_type)
            reply = secure_aggregation_mod(msg, self.contexts[msg.metadata.dst_node_id],
                                           self._train)
            out = answer(msg, reply.error if reply.has_error() else reply.content)
            self.received.append(out)
            replies.append(out)
        return replies
