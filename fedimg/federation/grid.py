"""A Grid wrapper that sees every exchange between the strategy and the clients.

Flower's strategies aggregate replies and keep only the averaged metrics. The
:class:`InstrumentedGrid` sits between a strategy and the real Grid and, for each
``send_and_receive``, records per client: the partition id, the metrics it
reported, the bytes sent down and up, and failures. It also rejects malformed
training updates (wrong keys or shapes, NaN/Inf) before the strategy can average
them in, logging the reason and counting rejections per client.

Node ids are returned ordered by partition id, so that the strategies' sampling
(``random.sample`` over ``get_node_ids()``) is reproducible once the server seeds
Python's ``random`` with the run seed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedimg.errors import FedimgError, UpdateError
from fedimg.federation.records import ARRAYS_KEY, DECLINED_KEY, check_arrays, record_bytes

log = logging.getLogger(__name__)


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
    status: str = "ok"  # ok | failed | rejected | timeout | declined
    reason: str = ""


def _content_bytes(content: RecordDict) -> int:
    return sum(record_bytes(r) for r in content.array_records.values())


def _metrics_of(content: RecordDict) -> tuple[dict[str, float], int]:
    if not content.metric_records:
        return {}, 0
    record = next(iter(content.metric_records.values()))
    metrics = {k: float(v) for k, v in record.items() if k != "num-examples"}
    return metrics, int(record.get("num-examples", 0))


class InstrumentedGrid(Grid):
    """Delegates to ``inner`` while logging exchanges and filtering bad updates."""

    def __init__(self, inner: Grid, *, reference: Mapping[str, torch.Tensor]) -> None:
        self.inner = inner
        self.reference = reference
        self.node_to_partition: dict[int, int] = {}
        self.exchanges: list[ClientExchange] = []
        self.rejections: Counter[int] = Counter()

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
        return sorted(ids, key=lambda n: (self.node_to_partition.get(n, 1 << 62), n))

    def partition_of(self, node_id: int) -> int:
        return self.node_to_partition.get(node_id, -1)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        pending = {nid: self._exchange_for(m) for nid, m in sent.items()}
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        kept = []
        for reply in replies:
            exchange = pending.pop(reply.metadata.src_node_id, None)
            if exchange is None:
                continue
            if self._record_reply(exchange, reply):
                kept.append(reply)
            self.exchanges.append(exchange)
        for exchange in pending.values():  # no reply within the timeout
            exchange.status, exchange.reason = "timeout", "no reply before fl.timeout_s"
            self.exchanges.append(exchange)
        # Replies arrive in completion order; aggregating them in partition order keeps
        # the float sums, and so the run, identical for the same seed.
        return sorted(kept, key=lambda r: (self.partition_of(r.metadata.src_node_id),
                                           r.metadata.src_node_id))

    def drain(self) -> list[ClientExchange]:
        """Exchanges recorded since the last call."""
        out, self.exchanges = self.exchanges, []
        return out

    def _exchange_for(self, message: Message) -> ClientExchange:
        nid = message.metadata.dst_node_id
        return ClientExchange(phase=message.metadata.message_type, node_id=nid,
                              partition_id=self.partition_of(nid),
                              bytes_down=_content_bytes(message.content))

    def _record_reply(self, exchange: ClientExchange, reply: Message) -> bool:
        """Fill ``exchange`` from ``reply``; False if the reply must not be aggregated."""
        if reply.has_error():
            exchange.status, exchange.reason = "failed", str(reply.error.reason)[:500]
            log.warning("client %d failed in %s: %s", exchange.partition_id,
                        exchange.phase, exchange.reason.splitlines()[-1:])
            return True  # the strategy counts it as a failure itself
        exchange.bytes_up = _content_bytes(reply.content)
        exchange.metrics, exchange.num_examples = _metrics_of(reply.content)
        if DECLINED_KEY in reply.content.config_records:
            exchange.status = "declined"
            exchange.reason = str(reply.content[DECLINED_KEY].get("reason", ""))
            log.info("client %d declined to train: %s", exchange.partition_id,
                     exchange.reason)
            return False
        if exchange.phase == MessageType.TRAIN:
            try:
                self._check_update(reply.content)
            except UpdateError as exc:
                exchange.status, exchange.reason = "rejected", str(exc)
                self.rejections[exchange.partition_id] += 1
                log.warning("rejected update of client %d: %s (rejections so far: %d)",
                            exchange.partition_id, exc,
                            self.rejections[exchange.partition_id])
                return False
        return True

    def _check_update(self, content: RecordDict) -> None:
        if ARRAYS_KEY not in content.array_records:
            raise UpdateError("training reply carries no model update")
        _, num_examples = _metrics_of(content)
        if num_examples <= 0:
            raise UpdateError(f"update claims {num_examples} training examples; FedAvg "
                              "weights need a positive count")
        arrays = {k: v.numpy() for k, v in content[ARRAYS_KEY].items()}
        check_arrays(arrays, self.reference)


def discover_partitions(grid: InstrumentedGrid, *, content: RecordDict, timeout: float,
                        connect_timeout: float,
                        expected_sizes: list[int]) -> dict[int, dict[str, float]]:
    """Ask every node for its partition id and sizes (a Flower ``query`` message).

    Also warms the workers up: each builds its task environment (data, model) here,
    so start-up cost is not charged to round 1. Raises FedimgError unless every
    partition answered with the training-set size the server computed for it, so
    a worker that cannot read the data stops the run before round 1.
    """
    started = time.perf_counter()
    nodes = _wait_for_nodes(grid.inner, len(expected_sizes), timeout=connect_timeout)
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n)
                for n in nodes]
    info: dict[int, dict[str, float]] = {}
    failures = []
    for reply in grid.inner.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            failures.append(str(reply.error.reason).strip().splitlines()[-1:])
            continue
        metrics, _ = _metrics_of(reply.content)
        grid.node_to_partition[reply.metadata.src_node_id] = int(metrics["partition-id"])
        info[int(metrics["partition-id"])] = metrics
    log.info("%d of %d clients ready in %.1fs", len(info), len(nodes),
             time.perf_counter() - started)
    _check_discovery(info, expected_sizes, failures)
    return info


def _wait_for_nodes(grid: Grid, count: int, *, timeout: float) -> list[int]:
    """Node ids once ``count`` nodes are connected (they register after the ServerApp starts)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise FedimgError(f"only {len(nodes)} of {count} clients connected within "
                              f"{timeout:.0f}s (fl.connect_timeout_s); under `flwr run` pass "
                              f"--federation-config 'num-supernodes={count}'")
        time.sleep(0.1)
    return nodes


def _check_discovery(info: dict[int, dict[str, float]], expected_sizes: list[int],
                     failures: list[list[str]]) -> None:
    missing = sorted(set(range(len(expected_sizes))) - set(info))
    if missing:
        first = f"; first failure: {failures[0]}" if failures else ""
        raise FedimgError(f"clients {missing[:10]} did not start ({len(failures)} "
                          f"failed){first}")
    wrong = [(pid, int(m["num-train"]), expected_sizes[pid]) for pid, m in info.items()
             if int(m["num-train"]) != expected_sizes[pid]]
    if wrong:
        pid, got, want = wrong[0]
        raise FedimgError(f"client {pid} sees {got} training samples but the server "
                          f"partitioned {want} for it: the workers read different data "
                          "(check FEDIMG_DATA / data.root on every machine)")
