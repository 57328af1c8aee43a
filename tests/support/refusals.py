"""One check for every config refusal test: refused in one line that names the fix."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from fedimg.errors import ConfigError
from fedimg.resolve import compose_and_check


def assert_refused_in_one_line(overrides: Sequence[str], says: str) -> None:
    """``scenario=medical`` with ``overrides`` raises ConfigError matching ``says``,
    on one line that says "Fix: "."""
    with pytest.raises(ConfigError, match=says) as caught:
        compose_and_check("medical", list(overrides))
    message = str(caught.value)
    assert "\n" not in message and "Fix: " in message
