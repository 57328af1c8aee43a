"""A Flower Grid without a network, for unit tests of code that drives one.

Subclasses set ``node_ids`` and answer ``send_and_receive`` themselves; the rest of
the Grid interface does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class OfflineGrid(Grid):
    """Connected nodes ``node_ids``; no replies unless a subclass scripts them."""

    node_ids: list[int] = [1, 2, 3]

    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return []

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return []
