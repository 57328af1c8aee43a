"""The transport: push messages, pull replies, pack arrays, count bytes. Nothing else.

:class:`Transport` wraps Flower's Grid for the round loop. One :meth:`Transport.exchange`
sends a batch of messages (their frozen arrays left out when ``fl.elide_frozen``, their
model arrays packed into one buffer when ``fl.pack_arrays``), polls for the replies
until a deadline, and returns one :class:`Exchange` per message: what was sent, what
came back (or nothing), and the bytes each way. What a reply *means* (a failure, an absence, a straggler, a
malformed update) is decided by the server's reply filters
(:mod:`fedimg.serverapp.filters`), not here.

It also keeps the address book: which node is which client (partition or site),
learnt at discovery, and :class:`NodeView`, the Grid a strategy samples from.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedimg.transport.elision import Elision
from fedimg.transport.packing import pack_content
from fedimg.transport.records import ARRAYS_KEY, PARTITION_KEY, record_bytes

POLL_S = 0.1  # seconds between pulls for replies (Flower's in-memory Grid uses 0.1 too)


@dataclass
class Exchange:
    """One message to one client and what came back; the reply filters fill the rest."""

    phase: str  # a flwr MessageType: "train" | "evaluate" | "query"
    partition_id: int
    node_id: int
    sent: Message  # as the strategy made it (its arrays not packed)
    bytes_down: int  # on the wire
    reply: Message | None = None
    bytes_up: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    class_counts: dict[str, float] = field(default_factory=dict)  # val/count/*: summed only
    num_examples: int = 0
    # ok | failed | rejected | timeout | declined | discarded | offline | dropped |
    # straggler (the last three: simulated devices, fedimg.simulation.fleet)
    status: str = "ok"
    reason: str = ""
    update_norm: float = float("nan")  # ||w_i - w_global||_2 of a training update
    arrays: Any = None  # a training update's decoded arrays, once a filter decoded them

    @property
    def usable(self) -> bool:
        """Still on its way to the strategy (no filter has set it aside)."""
        return self.status == "ok" and self.reply is not None


def error_summary(reason: str, limit: int = 300) -> str:
    """The informative line of a client error: Ray's and Flower's wrapping dropped.

    A ClientApp exception arrives as a whole remote traceback; its last line holds
    the exception (``RuntimeError: ...``). A dead worker's error is one line.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last.removesuffix("'>").strip()[:limit]


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays on the wire (a simulated partition's indices excluded:
    a real client holds its own data, so they exist only in simulation)."""
    return sum(record_bytes(r) for k, r in content.array_records.items() if k != PARTITION_KEY)


class Transport:
    """Flower's Grid as the round loop uses it: exchanges with a deadline."""

    def __init__(self, grid: Grid, *, pack: bool = False, elision: Elision | None = None
                 ) -> None:
        self.grid = grid
        self.pack = pack  # send model arrays as one buffer (fedimg.transport.packing)
        self.elision = elision  # frozen arrays stay home (fedimg.transport.elision)
        self.node_to_partition: dict[int, int] = {}
        self.first_push: float | None = None  # perf_counter of the run's first message out

    def node_ids(self) -> list[int]:
        """Connected nodes that take part, ordered by client id (so sampling repeats)."""
        ids = list(self.grid.get_node_ids())
        if self.node_to_partition:  # after discovery, only the clients it found take part:
            ids = [n for n in ids if n in self.node_to_partition]  # a later one has no size
        return sorted(ids, key=lambda n: (self.node_to_partition.get(n, 1 << 62), n))

    def partition_of(self, node_id: int) -> int:
        return self.node_to_partition.get(node_id, -1)

    def exchange(self, messages: Sequence[Message], *, timeout: float | None,
                 while_waiting: Callable[[], None] | None = None) -> list[Exchange]:
        """Send ``messages``, wait up to ``timeout`` s, and return them in client order.

        ``while_waiting`` runs once, right after the push: server work that can overlap
        the clients' (the initial model's evaluation, during round 1).
        """
        messages = list(messages)
        wire = self._wire(messages)
        pending = {m.metadata.dst_node_id: Exchange(
            phase=m.metadata.message_type, partition_id=self.partition_of(
                m.metadata.dst_node_id), node_id=m.metadata.dst_node_id, sent=m,
            bytes_down=content_bytes(w.content)) for m, w in zip(messages, wire)}
        for reply in self._push_and_pull(wire, timeout=timeout, while_waiting=while_waiting):
            exchange = pending.get(reply.metadata.src_node_id)
            if exchange is not None and exchange.reply is None:
                exchange.reply = reply
                exchange.bytes_up = 0 if reply.has_error() else content_bytes(reply.content)
        # Replies arrive in completion order; handling them in client order keeps the
        # float sums, and so the run, identical for the same seed.
        return sorted(pending.values(), key=lambda e: (e.partition_id, e.node_id))

    def _push_and_pull(self, messages: list[Message], *, timeout: float | None,
                       while_waiting: Callable[[], None] | None = None) -> list[Message]:
        """Flower's ``send_and_receive`` loop, polling for replies every ``POLL_S``.

        Flower's HTTP Grid (a real SuperLink) sleeps 3 s between pulls, so every
        exchange of a deployed round ended on a 3 s boundary; its in-memory Grid
        (simulation) already polls every 0.1 s, as this loop does for both.
        """
        if self.first_push is None:
            self.first_push = time.perf_counter()
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        if while_waiting is not None:
            while_waiting()
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        return replies

    def _wire(self, messages: list[Message]) -> list[Message]:
        """``messages`` as they travel, once per shared content: frozen arrays left out
        (``fl.elide_frozen``), then the model arrays packed (``fl.pack_arrays``)."""
        if not self.pack and self.elision is None:
            return messages
        wire: dict[int, RecordDict] = {}
        out = []
        for m in messages:
            if id(m.content) not in wire:
                content = m.content
                if self.elision is not None:
                    content = self.elision.elide(content)
                wire[id(m.content)] = pack_content(content, ARRAYS_KEY) if self.pack \
                    else content
            content = wire[id(m.content)]
            out.append(m if content is m.content else Message(
                content=content, message_type=m.metadata.message_type,
                dst_node_id=m.metadata.dst_node_id, group_id=m.metadata.group_id,
                ttl=m.metadata.ttl))
        return out


class NodeView(Grid):
    """The Grid a strategy sees: exactly the nodes the round loop sampled.

    Client sampling belongs to the round loop (its seeded generator, see
    :class:`fedimg.serverapp.state.Sampler`); a strategy built with fraction 1 then
    configures a message for each node it is shown. (Flower's ``sample_nodes`` still
    shuffles their order with the global ``random``, which decides nothing: replies are
    handled in client order.) It never sends anything itself.
    """

    def __init__(self, node_ids: Iterable[int]) -> None:
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def set_run(self, run: Any) -> None:  # pragma: no cover - never called by strategies
        raise NotImplementedError("a NodeView only lists nodes")

    @property
    def run(self) -> Any:  # pragma: no cover
        raise NotImplementedError("a NodeView only lists nodes")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError("a NodeView only lists nodes")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("strategies do not send; the round loop does")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("strategies do not send; the round loop does")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("strategies do not send; the round loop does")
