"""A Flower Grid without a network, for unit tests of code that drives one.

Subclasses set ``node_ids`` and answer ``send_and_receive`` themselves. Pushing
messages asks ``send_and_receive`` for the replies at once and keeps them for
``pull_messages`` (the calls fedimg's grid makes), matched by message id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


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
