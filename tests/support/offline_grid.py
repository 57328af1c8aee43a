"""A Flower Grid without a network, and fedimg's round loop over one, for unit tests.

Subclasses of :class:`OfflineGrid` set ``node_ids`` and answer ``send_and_receive``
themselves (``answer`` builds a reply). Pushing messages asks ``send_and_receive``
for the replies at once and keeps them for ``pull_messages`` (the calls
:class:`fedimg.transport.grid.Transport` makes), matched by message id.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedimg.config import FedimgConfig
from fedimg.serverapp.loop import LoopSetup, RoundLoop
from fedimg.serverapp.state import RunState, Sampler
from fedimg.serverapp.validation import UpdateChecks
from fedimg.transport.grid import Transport
from fedimg.transport.records import aggregate_metrics, metric_record, reply_content


class OfflineGrid(Grid):
    """Connected nodes ``node_ids``; no replies unless a subclass scripts them."""

    node_ids: list[int] = [1, 2, 3]
    _waiting: list[Message] | None = None  # replies pushed, not yet pulled

    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = {m.metadata.dst_node_id: f"offline-{id(m)}" for m in messages}
        if self._waiting is None:
            self._waiting = []
        for reply in self.send_and_receive(messages):
            reply.metadata.__dict__["_reply_to_message_id"] = ids[reply.metadata.src_node_id]
            self._waiting.append(reply)
        return list(ids.values())

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [r for r in self._waiting or [] if r.metadata.reply_to_message_id in wanted]
        self._waiting = [r for r in self._waiting or [] if r not in out]
        return out

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return []


def answer(message: Message, content: RecordDict | Error) -> Message:
    """The reply of ``message``'s destination node: ``content``, or an error."""
    reply = Message(content, reply_to=message)
    reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
    return reply


def update(weights: np.ndarray, *, num_examples: int, **metrics: float) -> RecordDict:
    """A training reply's content: the model ``{"w": weights}`` and its metrics."""
    return reply_content(metrics=metric_record(metrics, num_examples=num_examples),
                         arrays=ArrayRecord({"w": Array(np.asarray(weights))}))


def fedavg() -> Strategy:
    """Flower's FedAvg as fedimg builds it: fraction 1, min 1 (the loop samples)."""
    return FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1,
                  fraction_evaluate=1.0, min_evaluate_nodes=0,
                  train_metrics_aggr_fn=aggregate_metrics,
                  evaluate_metrics_aggr_fn=aggregate_metrics)


def offline_loop(cfg: FedimgConfig, grid: Grid, *, reference: Mapping[str, torch.Tensor],
                 callbacks: Sequence[Any] = (), strategy: Strategy | None = None,
                 checks: UpdateChecks | None = None, arrays: ArrayRecord | None = None,
                 node_to_partition: dict[int, int] | None = None,
                 train_config: ConfigRecord | None = None,
                 context: Mapping[str, ArrayRecord] | None = None) -> RoundLoop:
    """fedimg's RoundLoop over ``grid``: node n is client n - 1 unless told otherwise."""
    transport = Transport(grid, pack=False)
    transport.node_to_partition = (dict(node_to_partition) if node_to_partition is not None
                                   else {n: n - 1 for n in grid.get_node_ids()})
    start = arrays if arrays is not None else ArrayRecord(
        {k: Array(v.numpy()) for k, v in reference.items()})
    state = RunState(arrays=start, strategy=strategy or fedavg(), sampler=Sampler(cfg.seed))
    setup = LoopSetup(cfg=cfg, checks=checks or UpdateChecks(reference, fl=cfg.fl),
                      min_replies=cfg.fl.min_replies,
                      train_config=train_config or ConfigRecord(),
                      evaluate_config=ConfigRecord(), reference=reference,
                      context=dict(context or {}))
    return RoundLoop(setup, state, transport, callbacks)


class Recording:
    """A round-loop callback that keeps every result and record, as MetricsWriter does."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.records: list[dict[str, Any]] = []

    def metrics(self, state: RunState, result: Any) -> dict[str, Any]:
        return {}

    def on_record(self, state: RunState, result: Any, record: dict[str, Any]) -> None:
        self.results.append(result)
        self.records.append(record)
        state.rounds.append(record)

    def on_run_end(self, state: RunState) -> None:
        return None
