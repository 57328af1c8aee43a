"""A whole federation on one machine: a SuperLink and site daemons on localhost.

For trying a deployment before rolling it out, and for the deployment integration
test and latency benchmark. It runs the product's own launchers
(``python -m fedimg.server`` / ``python -m fedimg.client``) as real processes, each
in its own process group with its output in ``<root>/<name>.log``, and a private
``FLWR_HOME`` under ``root``.

As on a real coordinator, the SuperLink listens on loopback only
(``internal_address``: the flwr CLI's connection) and nginx on ``address``, the one
the sites dial, forwarding only the Fleet API (:mod:`fedimg.deploy.proxy`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def site_yaml(path: Path, *, name: str, superlink: str, ca: Path, key: Path, data: Path,
              classes: Sequence[str], port: int, state_dir: Path, warm: bool = True,
              extra: str = "") -> Path:
    """Write a site config for a daemon on this machine (one thread, quick reconnects).

    A refused activation is believed at once (``activation_grace_s: 0``): nodes here
    never die uncleanly and come straight back. ``extra`` is appended as YAML (e.g. a
    ``policy:`` section).
    """
    path.write_text(
        f"name: {name}\nsuperlink: {superlink}\nca_certificate: {ca}\nprivate_key: {key}\n"
        f"data: {data}\nscenario: medical\nclasses: [{', '.join(classes)}]\ndevice: cpu\n"
        f"port: {port}\nstate_dir: {state_dir}\nwarm: {str(warm).lower()}\n"
        "limits: {num_threads: 1, min_samples: 16}\n"
        "reconnect: {backoff_s: 2, activation_grace_s: 0}\n" + extra)
    return path


class LocalFederation:
    """The processes of one localhost federation, and what they printed."""

    def __init__(self, root: Path, *, connection: str = "fedimg-local") -> None:
        self.root, self.connection = root, connection
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr_home"),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FEDIMG_CACHE": str(root / "cache")}
        self.port = free_port()  # nginx: what the sites dial
        self.address = f"127.0.0.1:{self.port}"
        self.internal_port = free_port()  # the SuperLink itself, all APIs (flwr dials it)
        while self.internal_port == self.port:
            self.internal_port = free_port()
        self.internal_address = f"127.0.0.1:{self.internal_port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Run ``python -m ARGS`` as process ``name``, logging to ``<root>/<name>.log``."""
        with open(self.root / f"{name}.log", "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", *args], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, timeout: float = 120, *, count: int = 1) -> None:
        """Wait until ``name`` printed ``text`` (``count`` times in its log, which restarts
        append to); AssertionError if it died or timed out."""
        deadline = time.monotonic() + timeout
        while self.output(name).count(text) < count:
            proc = self.procs[name]
            tail = self.output(name)[-3000:]
            assert proc.poll() is None, f"{name} exited {proc.returncode}: {tail}"
            assert time.monotonic() < deadline, f"{name}: no '{text}' in {tail}"
            time.sleep(0.5)

    def stop(self, name: str) -> None:
        """SIGTERM process ``name``'s group (SIGKILL after 30 s)."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def superlink(self, *, pki: Path, keys: Path) -> None:
        """Start the SuperLink launcher and wait until it is ready.

        That is: the SuperLink (TLS, node auth) on ``internal_address``, its SuperExec,
        nginx on ``address``, the connection written and the keys registered.
        """
        log = self.root / "server.log"
        ready = "SuperLink ready"
        before = log.read_text(errors="replace").count(ready) if log.exists() else 0
        self.start("server", "fedimg.server", "superlink", "--certs", str(pki), "--keys",
                   str(keys), "--host", "127.0.0.1", "--port", str(self.port),
                   "--internal-port", str(self.internal_port), "--name", self.connection)
        self.wait_for("server", ready, count=before + 1)

    def daemon(self, name: str, site: Path) -> None:
        """Start a site daemon and wait until its SuperNode has joined."""
        self.start(name, "fedimg.client", "--site", str(site))
        self.wait_for(name, "SuperNode ID:")

    def _run_command(self, overrides: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "fedimg.server", "run", "--connection", self.connection,
                "--runs-dir", str(self.root / "runs"), *overrides]

    def run(self, overrides: Sequence[str], *,
            timeout: float = 900) -> tuple[subprocess.CompletedProcess, Path]:
        """Submit a run (``fedimg-server run``); its result and run directory."""
        proc = subprocess.run(self._run_command(overrides), env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        return proc, self.run_dir(proc.stdout)

    def submit(self, overrides: Sequence[str]) -> subprocess.Popen:
        """Submit a run in the background; ``communicate()`` gives its output.

        It runs in its own session, so :meth:`cancel` can stop it together with the
        ``flwr run`` child that streams its logs (and holds its output pipe open).
        """
        return subprocess.Popen(self._run_command(overrides), env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)

    @staticmethod
    def cancel(proc: subprocess.Popen) -> str:
        """SIGKILL a submitted run and its children; the output it printed."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it already ended
        out, _ = proc.communicate(timeout=60)
        return out or ""

    @staticmethod
    def run_dir(stdout: str) -> Path:
        """The run directory ``fedimg-server run`` printed."""
        line = next((ln for ln in stdout.splitlines() if ln.startswith("run directory:")),
                    "run directory: ?")
        return Path(line.split(":", 1)[1].strip())
