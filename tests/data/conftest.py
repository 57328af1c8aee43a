"""Fixtures of the data tests: an isolated decode cache for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point $FEDIMG_CACHE at a temp dir so tests neither read nor fill ~/.cache."""
    cache = tmp_path_factory.mktemp("fedimg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDIMG_CACHE", str(cache))
        yield cache
