"""Name-keyed registries.

Models, datasets, partitioners, strategies and optimizers are all chosen by a
string from the config. A :class:`Registry` maps those names to builders, so the
config value, the registry key and the builder name are the same string (as in
torchvision's ``register_model``/``get_model``) and no code branches on strings.
An unknown name raises :class:`~fedimg.errors.ConfigError` listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedimg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to objects, with helpful errors for unknown names."""

    def __init__(self, kind: str, *, config_key: str | None = None) -> None:
        self.kind = kind
        self.config_key = config_key or kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (default: its ``__name__``)."""

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` without a decorator."""
        self.register(name)(obj)

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise a ConfigError."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        """One-line message naming the bad value and the valid ones."""
        return (
            f"unknown {self.kind} '{name}' ({self.config_key}); "
            f"valid names: {', '.join(self.names())}"
        )

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
