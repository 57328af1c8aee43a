"""The one rule every config check follows: a failed check is a one-line ConfigError."""

from __future__ import annotations

from fedimg.errors import ConfigError


def check(ok: bool, message: str) -> None:
    """Raise :class:`~fedimg.errors.ConfigError` with ``message`` unless ``ok``.

    ``message`` names the bad value, the valid options and the fix, on one line.
    """
    if not ok:
        raise ConfigError(message)
