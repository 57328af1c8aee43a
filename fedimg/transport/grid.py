"""A Grid wrapper that sees every exchange between the strategy and the clients.

Flower's strategies aggregate replies and keep only the averaged metrics. The
:class:`InstrumentedGrid` sits between a strategy and the real Grid and, for each
``send_and_receive``, records per client: the partition id, the metrics it
reported, the bytes sent down and up, and failures. It rejects malformed training
updates (see :mod:`fedimg.serverapp.validation`) before the strategy can average
them in, logging the reason and counting rejections per client.

It also carries each client's DP ledger: it keeps the latest one a client reported
(for the resume checkpoint, and in ``ledger_path`` as soon as it arrives) and hands
a restored ledger back to its client with every training message until the client
has acknowledged it by replying with its ledger.

Node ids are returned ordered by partition id, so that the strategies' sampling
(``random.sample`` over ``get_node_ids()``) is reproducible once the server seeds
Python's ``random`` with the run seed.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedimg.simulation import fleet
from fedimg.transport.codecs import decompress_update
from fedimg.config import HeterogeneityConfig
from fedimg.errors import FedimgError, UpdateError
from fedimg.transport.records import (
    ARRAYS_KEY,
    COMPRESSION_KEY,
    DECLINED_KEY,
    LEDGER_KEY,
    record_bytes,
)
from fedimg.transport.packing import pack_content, unpack_content
from fedimg.serverapp.validation import UpdateChecks, metrics_of
from fedimg.reporting.run_dir import write_json

log = logging.getLogger(__name__)

POLL_S = 0.1  # seconds between pulls for replies (Flower's in-memory Grid uses 0.1 too)


@dataclass
class ClientExchange:
    """One message to one client and what came back."""

    phase: str  # "train" | "evaluate" | "query"
    partition_id: int
    node_id: int
    bytes_down: int
    bytes_up: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0
    status: str = "ok"  # ok | failed | rejected | timeout | declined | offline | dropped
    #                     | straggler (hetero.*: see fedimg.simulation.fleet)
    reason: str = ""
    update_norm: float = float("nan")  # ||w_i - w_global||_2 of a training update


def error_summary(reason: str, limit: int = 300) -> str:
    """The informative line of a client error: Ray's and Flower's wrapping dropped.

    A ClientApp exception arrives as a whole remote traceback; its last line holds
    the exception (``RuntimeError: ...``). A dead worker's error is one line.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last.removesuffix("'>").strip()[:limit]


def _content_bytes(content: RecordDict) -> int:
    return sum(record_bytes(r) for r in content.array_records.values())


class InstrumentedGrid(Grid):
    """Delegates to ``inner`` while logging exchanges and filtering bad updates."""

    def __init__(self, inner: Grid, *, reference: Mapping[str, torch.Tensor],
                 checks: UpdateChecks | None = None, ledger_path: Path | None = None,
                 pack: bool = False, hetero: HeterogeneityConfig | None = None) -> None:
        self.inner = inner
        self.hetero = hetero or HeterogeneityConfig()  # the round deadline of stragglers
        self.pack = pack  # send model arrays as one buffer (fedimg.transport.packing)
        self.reference = reference
        self.checks = checks or UpdateChecks(reference)
        self.ledger_path = ledger_path
        self.node_to_partition: dict[int, int] = {}
        self.exchanges: list[ClientExchange] = []
        self.rejections: Counter[int] = Counter()
        self.ledgers: dict[int, str] = {}  # partition -> latest DP ledger (JSON) it reported
        self.pending_ledgers: dict[int, str] = {}  # restored ledgers not yet handed back
        self._decoded: dict[int, dict[str, np.ndarray] | None] = {}  # id(content) -> arrays

    # --- plain delegation -------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    # --- instrumented -----------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        ids = list(self.inner.get_node_ids())
        if self.node_to_partition:  # after discovery, only the clients it found take part:
            ids = [n for n in ids if n in self.node_to_partition]  # a later one has no size
        return sorted(ids, key=lambda n: (self.node_to_partition.get(n, 1 << 62), n))

    def partition_of(self, node_id: int) -> int:
        return self.node_to_partition.get(node_id, -1)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         late: tuple[str, str] = ("timeout", "no reply before fl.timeout_s"),
                         ) -> Iterable[Message]:
        """Send, wait up to ``timeout``, record; ``late`` is the status of a missing reply."""
        messages = [self._with_ledger(m) for m in messages]
        sent = {m.metadata.dst_node_id: m for m in messages}
        wire = self._packed(messages)
        self._decoded = {}  # the global arrays of this call's messages, decoded once
        pending = {m.metadata.dst_node_id: self._exchange_for(m) for m in wire}
        replies = self._push_and_pull(wire, timeout=timeout)
        kept: dict[int, tuple[Message, ClientExchange]] = {}
        for reply in replies:
            exchange = pending.pop(reply.metadata.src_node_id, None)
            if exchange is None:
                continue
            if self._record_reply(exchange, reply, sent[exchange.node_id]):
                kept[exchange.node_id] = (reply, exchange)
            self.exchanges.append(exchange)
        self._reject_outlier_norms(kept)
        for exchange in pending.values():  # no reply within the timeout
            exchange.status, exchange.reason = late
            self.exchanges.append(exchange)
        # Replies arrive in completion order; aggregating them in partition order keeps
        # the float sums, and so the run, identical for the same seed.
        return sorted((reply for reply, _ in kept.values()),
                      key=lambda r: (self.partition_of(r.metadata.src_node_id),
                                     r.metadata.src_node_id))

    def _push_and_pull(self, messages: list[Message], *,
                       timeout: float | None) -> list[Message]:
        """Flower's ``send_and_receive`` loop, polling for replies every ``POLL_S``.

        Flower's HTTP Grid (a real SuperLink) sleeps 3 s between pulls, so every
        exchange of a deployed round ended on a 3 s boundary; its in-memory Grid
        (simulation) already polls every 0.1 s, as this loop does for both.
        """
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        return replies

    def _packed(self, messages: list[Message]) -> list[Message]:
        """``messages`` with their model arrays packed, once per shared content."""
        if not self.pack:
            return messages
        packed: dict[int, RecordDict] = {}
        out = []
        for m in messages:
            if id(m.content) not in packed:
                packed[id(m.content)] = pack_content(m.content, ARRAYS_KEY)
            content = packed[id(m.content)]
            out.append(m if content is m.content else Message(
                content=content, message_type=m.metadata.message_type,
                dst_node_id=m.metadata.dst_node_id, group_id=m.metadata.group_id,
                ttl=m.metadata.ttl))
        return out

    def _with_ledger(self, message: Message) -> Message:
        """``message``, carrying its client's restored DP ledger if one is pending."""
        pid = self.partition_of(message.metadata.dst_node_id)
        if message.metadata.message_type != MessageType.TRAIN or pid not in self.pending_ledgers:
            return message
        content = RecordDict(dict(message.content.items()))  # strategies share one content
        content[LEDGER_KEY] = ConfigRecord({"json": self.pending_ledgers[pid]})
        return Message(content=content, message_type=message.metadata.message_type,
                       dst_node_id=message.metadata.dst_node_id,
                       group_id=message.metadata.group_id)

    def _reject(self, exchange: ClientExchange, reason: str) -> None:
        exchange.status, exchange.reason = "rejected", reason
        self.rejections[exchange.partition_id] += 1
        log.warning("rejected update of client %d: %s (rejections so far: %d)",
                    exchange.partition_id, reason, self.rejections[exchange.partition_id])

    def _reject_outlier_norms(self, kept: dict[int, tuple[Message, ClientExchange]]) -> None:
        """Drop updates whose norm is far above the round's median (absurd, not just large)."""
        norms = {nid: e.update_norm for nid, (_, e) in kept.items()}
        for nid, reason in self.checks.outliers(norms).items():
            self._reject(kept.pop(nid)[1], reason)

    def drain(self) -> list[ClientExchange]:
        """Exchanges recorded since the last call."""
        out, self.exchanges = self.exchanges, []
        return out

    def _exchange_for(self, message: Message) -> ClientExchange:
        nid = message.metadata.dst_node_id
        return ClientExchange(phase=message.metadata.message_type, node_id=nid,
                              partition_id=self.partition_of(nid),
                              bytes_down=_content_bytes(message.content))

    def _record_reply(self, exchange: ClientExchange, reply: Message, sent: Message) -> bool:
        """Fill ``exchange`` from ``reply``; False if the reply must not be aggregated."""
        if reply.has_error():
            raw = str(reply.error.reason)
            # simulated device behaviour (fedimg.simulation.fleet), not a fault
            absent = (fleet.absence_status(raw) if reply.error.code == fleet.ABSENT_CODE
                      else None)
            exchange.status, exchange.reason = absent or "failed", error_summary(raw)
            (log.debug if absent else log.warning)(
                "client %d %s in %s: %s", exchange.partition_id, exchange.status,
                exchange.phase, exchange.reason)
            return True  # the strategy counts it as a failure itself
        exchange.bytes_up = _content_bytes(reply.content)  # on the wire: packed, compressed
        try:
            reply.content = unpack_content(reply.content)
        except UpdateError as exc:
            self._reject(exchange, str(exc))
            return False
        exchange.metrics, exchange.num_examples = metrics_of(reply.content)
        if LEDGER_KEY in reply.content.config_records:
            self._keep_ledger(exchange.partition_id, str(reply.content[LEDGER_KEY]["json"]))
        if DECLINED_KEY in reply.content.config_records:
            exchange.status = "declined"
            exchange.reason = str(reply.content[DECLINED_KEY].get("reason", ""))
            log.info("client %d declined to train: %s", exchange.partition_id,
                     exchange.reason)
            return False
        device_s = exchange.metrics.get("hetero/device_s", 0.0)
        if exchange.phase == MessageType.TRAIN and fleet.late(self.hetero, device_s):
            exchange.status = "straggler"
            exchange.reason = (f"arrived after {device_s:.2f}s of device time, past the "
                               f"hetero.deadline_s={self.hetero.deadline_s}s")
            return False
        if exchange.phase == MessageType.TRAIN:
            try:
                start = self._global_arrays(sent.content)
                arrays = self._update_arrays(reply.content, start)
                exchange.update_norm = self.checks.check(
                    arrays, start, num_examples=exchange.num_examples,
                    partition_id=exchange.partition_id)
            except UpdateError as exc:
                self._reject(exchange, str(exc))
                return False
        return True

    def _global_arrays(self, sent: RecordDict) -> dict[str, np.ndarray] | None:
        """The global arrays a message carried, decoded once per round's shared content."""
        key = id(sent)
        if key not in self._decoded:
            self._decoded[key] = ({k: v.numpy() for k, v in sent[ARRAYS_KEY].items()}
                                  if ARRAYS_KEY in sent.array_records else None)
        return self._decoded[key]

    def _update_arrays(self, content: RecordDict,
                       start: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """A training reply's weights; a compressed one is rebuilt, in ``content`` too."""
        if ARRAYS_KEY not in content.array_records:
            raise UpdateError("training reply carries no model update")
        arrays = {k: v.numpy() for k, v in content[ARRAYS_KEY].items()}
        if COMPRESSION_KEY not in content.config_records:
            return arrays
        if start is None:
            raise UpdateError("compressed update for a message that carried no model")
        try:
            arrays = decompress_update(str(content[COMPRESSION_KEY]["codec"]), arrays, start,
                                       self.checks.immutable_keys)
        except FedimgError as exc:  # an unknown codec is a malformed update here
            raise UpdateError(str(exc)) from exc
        content[ARRAYS_KEY] = ArrayRecord({k: Array(np.asarray(v, order="C"))
                                           for k, v in arrays.items()})
        return arrays

    def _keep_ledger(self, partition_id: int, ledger: str) -> None:
        """Keep a client's latest DP ledger, on disk at once if ``ledger_path`` is set."""
        self.ledgers[partition_id] = ledger
        self.pending_ledgers.pop(partition_id, None)  # the client holds its ledger now
        if self.ledger_path is not None:
            write_json(self.ledger_path, {str(k): v for k, v in sorted(self.ledgers.items())})
