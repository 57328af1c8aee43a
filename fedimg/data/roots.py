"""Where data lives: the data root, the user cache dir and fail-fast downloads.

The data root is ``data.root``, else ``$FEDIMG_DATA``, else the user cache dir
(``$XDG_CACHE_HOME/fedimg`` or ``~/.cache/fedimg``). Decoded-image caches go to
``<cache dir>/decoded`` (``$FEDIMG_CACHE`` overrides the cache dir, e.g. in tests).
Downloads first probe the host with a short timeout so an offline machine fails
in well under a second instead of hanging.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
DOWNLOAD_TIMEOUT_S = 30.0


def _xdg_cache() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedimg"


def user_cache_dir() -> Path:
    """Where decode caches go: ``$FEDIMG_CACHE``, else ``$XDG_CACHE_HOME/fedimg`` (or ~)."""
    explicit = os.environ.get("FEDIMG_CACHE")
    return Path(explicit).expanduser() if explicit else _xdg_cache()


def resolve_data_root(root: str | None) -> Path:
    """The data root: ``root`` (``data.root``), else ``$FEDIMG_DATA``, else the cache dir.

    Returned absolute, so results.json records where the data really was.
    """
    if root:
        return Path(root).expanduser().resolve()
    env = os.environ.get("FEDIMG_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return _xdg_cache()


def md5sum(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def host_reachable(url: str, *, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if ``url``'s host accepts a TCP connection, else the reason it does not."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{parts.hostname}:{port} unreachable ({type(exc).__name__}: {exc})"


def download_file(url: str, dest: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download ``url`` to ``dest`` atomically (temp file + rename); raises OSError."""
    reason = host_reachable(url)
    if reason is not None:
        raise OSError(reason)
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "fedimg"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as r:
            for block in iter(lambda: r.read(1 << 20), b""):
                out.write(block)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
