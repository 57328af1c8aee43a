"""The warm executor serves only the fedimg installed at the site, and signs its polls."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from flwr.clientapp.client_app import LoadClientAppError
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    AcquireTaskResponse,
)
from flwr.supercore.auth import derive_auth_secret, verify_superexec_request

import fedimg
from fedimg.deploy.warm import (
    WarmExecutor,
    _client,
    fab_digest,
    installed_digest,
    source_digest,
)
from fedimg.deploy.warm import main as warm_main
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


class _Nonces:
    """Flower's nonce store, in memory: each nonce is accepted once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def reserve_nonce(self, namespace: str, nonce: str, expires_at: float) -> bool:
        fresh = nonce not in self.seen
        self.seen.add(nonce)
        return fresh


def _acquire(secret: bytes | None) -> httpx.Request:
    """Send one AcquireTask through the executor's poller; the request the server got."""
    sent: list[httpx.Request] = []

    def runtime_api(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=AcquireTaskResponse().SerializeToString(),
                              headers={"content-type": "application/protobuf"})

    poller = _client("127.0.0.1:9094", "SuperExec", auth_secret=secret)
    poller._client = httpx.Client(transport=httpx.MockTransport(runtime_api))
    poller.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    return sent[0]


def _accepted(request: httpx.Request, secret: bytes, nonces: _Nonces) -> bool:
    """What the SuperNode's Runtime API decides (Flower's own verifier)."""
    body = AcquireTaskRequest.FromString(request.content)
    return verify_superexec_request(
        request=body, method="/flwr.proto.Runtime/AcquireTask",
        auth_secret=derive_auth_secret(secret), nonce_store=nonces,
        timestamp_raw=request.headers.get("flwr-superexec-ts", ""),
        nonce=request.headers.get("flwr-superexec-nonce", ""),
        body_sha256_header=request.headers.get("flwr-superexec-body-sha256", ""),
        signature=request.headers.get("flwr-superexec-signature", ""))


def test_acquire_task_is_signed_with_the_secret_the_supernode_checks() -> None:
    # Arrange
    secret, other = b"\x01" * 32, b"\x02" * 32
    # Act
    signed, unsigned = _acquire(secret), _acquire(None)
    # Assert: accepted once under the right secret; not under another, not unsigned
    assert _accepted(signed, secret, _Nonces())
    assert not _accepted(signed, other, _Nonces())
    nonces = _Nonces()
    assert _accepted(signed, secret, nonces) and not _accepted(signed, secret, nonces)  # replay
    assert "flwr-superexec-signature" not in unsigned.headers
    assert not _accepted(unsigned, secret, _Nonces())


def test_an_empty_secret_file_stops_the_executor_with_exit_2(tmp_path: Path, caplog) -> None:
    # Arrange
    (tmp_path / "secret").write_bytes(b"")
    # Act
    code = warm_main(["--runtime-api-address", "127.0.0.1:9", "--superexec-auth-secret-file",
                      str(tmp_path / "secret")])
    # Assert
    assert code == 2 and "must not be empty" in caplog.text
