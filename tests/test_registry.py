"""The name-keyed registry."""

from __future__ import annotations

import pytest

from fedimg.errors import ConfigError
from fedimg.registry import Registry


def test_register_get_and_list() -> None:
    reg: Registry[int] = Registry("widget", config_key="w.kind")
    reg.add("b", 2)
    reg.add("a", 1)
    assert reg.get("a") == 1
    assert reg.names() == ["a", "b"]
    assert "b" in reg and len(reg) == 2


def test_unknown_name_lists_valid_ones() -> None:
    reg: Registry[int] = Registry("widget", config_key="w.kind")
    reg.add("alpha", 1)
    with pytest.raises(ConfigError, match=r"^unknown widget 'beta' \(w.kind\); valid names: alpha$"):
        reg.get("beta")


def test_duplicate_registration_is_refused() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="twice"):
        reg.add("a", 2)
