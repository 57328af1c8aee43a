"""The warm executor serves only the fedimg installed at the site."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.clientapp.client_app import LoadClientAppError

import fedimg
from fedimg.deploy.warm import WarmExecutor, fab_digest, installed_digest, source_digest
from fedimg.clientapp import app as client_app


def _fab(*, edit: str | None = None) -> bytes:
    """A zip holding the installed fedimg sources (one file edited if asked), as a FAB does."""
    package = Path(fedimg.__file__).resolve().parent
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        fab.writestr("pyproject.toml", "[project]\nname = 'fedimg'\n")
        for path in package.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            name = f"fedimg/{path.relative_to(package).as_posix()}"
            data = path.read_bytes() + (b"\n# changed\n" if name == edit else b"")
            fab.writestr(name, data)
    return buffer.getvalue()


def test_digest_depends_on_every_source_file_and_only_fedimg_py() -> None:
    base = {"fedimg/a.py": b"x = 1\n", "fedimg/b.py": b"y = 2\n"}
    assert source_digest(base) == source_digest({**base, "README.md": b"other"})
    assert source_digest(base) != source_digest({**base, "fedimg/b.py": b"y = 3\n"})
    assert source_digest(base) != source_digest({"fedimg/a.py": b"x = 1\n"})


def test_the_installed_app_is_served_and_another_is_refused() -> None:
    # Arrange
    executor = WarmExecutor.__new__(WarmExecutor)  # no Runtime API connection needed
    executor.checked, executor._installed = {}, installed_digest()
    same = SimpleNamespace(hash_str="same", content=_fab())
    other = SimpleNamespace(hash_str="other",
                            content=_fab(edit="fedimg/clientapp/app.py"))
    # Act / Assert
    assert fab_digest(same.content) == executor._installed
    assert executor.app_for(same) is client_app.app
    with pytest.raises(LoadClientAppError, match="not the fedimg installed at this site"):
        executor.app_for(other)
    assert executor.checked == {"same": "", "other": executor.checked["other"]}
