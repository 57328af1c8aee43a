"""Child processes of the deployment launchers: process groups, signals, secrets.

A launcher (:mod:`fedimg.deploy.client`, :mod:`fedimg.deploy.server`) runs Flower's
daemons as children in their own process group (:func:`start`), so that stopping one
stops what it spawned (:func:`stop_group`); SIGTERM/SIGINT set an event the launcher
waits on (:func:`stop_on_signals`, :func:`run_until_stopped`), which can also stop a
group that outgrows a memory limit (:func:`group_rss_bytes`). Per-start secrets live in
a folder only this user can enter (:func:`private_dir`, :func:`write_secret`).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fedimg.errors import ConfigError

log = logging.getLogger(__name__)

STOP_GRACE_S = 15.0  # SIGTERM -> SIGKILL of a child's process group

def stop_group(proc: subprocess.Popen, *, grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace_s``; return its exit code."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0fs; killing it", proc.pid, grace_s)
    return proc.wait()


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT set ``stop`` (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in group ``pgid`` (from Linux /proc; 0 elsewhere)."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if int(fields[2]) == pgid:  # pgrp
                total += int(fields[21]) * page  # rss in pages
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
    return total


def run_until_stopped(proc: subprocess.Popen, stop: threading.Event, *,
                      memory_bytes: int | None = None) -> int | None:
    """Wait for ``proc``; on ``stop`` terminate its group. None if it was stopped by us.

    With ``memory_bytes``, the group is also stopped (like an OOM kill) when its
    resident memory exceeds it; checked every 2 s.
    """
    polls = 0
    while proc.poll() is None:
        if stop.wait(0.2):
            log.info("stopping pid %d and its process group", proc.pid)
            stop_group(proc)
            return None
        polls += 1
        if memory_bytes and polls % 10 == 0 and group_rss_bytes(proc.pid) > memory_bytes:
            log.error("pid %d and its children use more than %.1f GB (limits.memory_gb); "
                      "stopping them", proc.pid, memory_bytes / 2**30)
            return stop_group(proc)
    try:  # leftovers of the group (e.g. flower-superexec) follow their parent
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.returncode


def start(command: Sequence[str], *, env: Mapping[str, str] | None = None,
          stdout: int | None = None) -> subprocess.Popen:
    """Start ``command`` in a new process group (stderr joins ``stdout`` when piped)."""
    try:
        return subprocess.Popen(list(command), env=None if env is None else dict(env),
                                stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                                text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        raise ConfigError(f"cannot start {command[0]} ({exc}). Fix: install flwr==1.41 in "
                          "this environment (pip install -e .) or put it on PATH.") from exc


SECRET_FILE = "superexec.secret"


@contextmanager
def private_dir(parent: Path | None, *, prefix: str) -> Iterator[Path]:
    """A folder only this user can enter (0700), removed on leaving.

    ``parent/runtime`` if ``parent`` is given (a site's ``state_dir``), else a new
    ``tempfile.mkdtemp`` folder. It holds per-start files such as the SuperExec secret.
    """
    if parent is None:
        folder = Path(tempfile.mkdtemp(prefix=prefix))
    else:
        folder = parent / "runtime"
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"runtime folder {folder} cannot be created ({exc}). Fix: make "
                              f"{parent} writable for this user.") from exc
    folder.chmod(0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_secret(folder: Path) -> Path:
    """A fresh 32-byte SuperExec secret in ``folder``, mode 0600; its path (never logged)."""
    path = folder / SECRET_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    return path
