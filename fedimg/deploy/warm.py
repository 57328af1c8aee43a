"""A warm ClientApp executor for a deployed SuperNode: one process serves every message.

By default a Flower 1.41 SuperNode starts a fresh ``flwr-clientapp`` process for
every message it receives. Each one imports torch, Flower and fedimg, unpacks the
app bundle, reads the site's images and builds the network before it trains for
a second or two; here that start-up took about 4.5 s of every message
(BENCHMARKS.md §8).

Flower leaves the executor pluggable: a SuperNode started with
``--isolation process`` runs no executor of its own, and a process that polls its
Runtime API (``AcquireTask``) takes the tasks. This module is such a process. The
client daemon starts both with the same ``--superexec-auth-secret-file`` (a fresh
32-byte secret per start), so the SuperNode hands tasks only to ``AcquireTask``
requests HMAC-signed with it (Flower's ``SuperExecAuthHttpInterceptor``), not to
any other process on the host.
It polls every ``poll_interval`` seconds and runs each ClientApp task in itself,
with the steps ``flwr-clientapp`` runs (Flower's own ``pull_task_input``,
``push_message`` and ``push_task_output``), but without exiting afterwards. The
imports, the decoded site data and the model (``fedimg.clientapp.environment.site_environment``)
therefore stay in memory between messages and rounds.

Isolation is what this trades, so the executor runs nothing but the fedimg
ClientApp installed at the site: a task whose app bundle carries other fedimg
sources (an upgraded coordinator) or another app is refused with an error reply
saying why (``warm: false`` in the site config gives Flower's process per message,
which runs whatever app is submitted). A task that raises, or whose reply cannot
be pushed, is reported as failed, like in ``flwr-clientapp``, and the executor goes
on to the next one.
Built against flwr 1.41.0 (pinned in pyproject.toml); its Runtime API internals may
change in other versions.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

import fedimg
from fedimg.clientapp import app as client_app
from fedimg.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 0.1
# What a SuperNode started with --superexec-auth-secret-file checks (as flower-superexec).
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})


def _client(address: str, component: str, token: str | None = None, *,
            auth_secret: bytes | None = None) -> RuntimeHttpClient:
    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    if auth_secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret,
                                                         protected_methods=AUTH_METHODS))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def _heartbeat_fn(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat without its side effects on this long-lived process.

    Flower's version raises SIGINT in the process when the SuperNode says the task
    is over and re-raises HTTP errors, which would end a ``flwr-clientapp``
    process but here would kill the executor and every later task.
    """
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            if not client.SendTaskHeartbeat(request).success:
                log.warning("the SuperNode no longer knows this task (stopped or expired)")
            return True
        except (httpx.HTTPError, OSError):
            return False

    return send


def source_digest(files: Mapping[str, bytes]) -> str:
    """SHA-256 over the ``fedimg/**.py`` entries of ``files`` (relative path -> bytes)."""
    digest = hashlib.sha256()
    for name in sorted(n for n in files if n.startswith("fedimg/") and n.endswith(".py")):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    return digest.hexdigest()


def installed_digest() -> str:
    """:func:`source_digest` of the fedimg package this process imported."""
    package = Path(fedimg.__file__).resolve().parent
    return source_digest({f"fedimg/{p.relative_to(package).as_posix()}": p.read_bytes()
                          for p in package.rglob("*.py") if "__pycache__" not in p.parts})


def fab_digest(content: bytes) -> str:
    """:func:`source_digest` of the fedimg sources inside a FAB (a zip)."""
    with zipfile.ZipFile(io.BytesIO(content)) as fab:
        return source_digest({n: fab.read(n) for n in fab.namelist()})


class WarmExecutor:
    """Takes ClientApp tasks from a SuperNode's Runtime API and runs them in-process.

    It runs fedimg's ClientApp as installed at the site, and serves a run only if
    the submitted app's fedimg sources are byte-identical to it; any other app (an
    upgraded coordinator, a foreign app) is refused with an error reply that says so.
    With ``auth_secret`` (the SuperNode's ``--superexec-auth-secret-file``), its
    ``AcquireTask`` polls are HMAC-signed as ``flower-superexec`` signs them.
    """

    def __init__(self, runtime_address: str, *, poll_interval: float = DEFAULT_POLL_S,
                 auth_secret: bytes | None = None) -> None:
        self.address = runtime_address
        self.poll_interval = poll_interval
        self._auth_secret = auth_secret
        self.checked: dict[str, str] = {}  # FAB hash -> "" if served, else why refused
        self.served = 0
        self._installed = installed_digest()

    def serve(self, *, max_tasks: int | None = None) -> None:
        """Poll for tasks and run them until stopped (or after ``max_tasks``)."""
        poller = _client(self.address, "SuperExec", auth_secret=self._auth_secret)
        log.info("warm executor polling %s every %.2fs (AcquireTask %s)", self.address,
                 self.poll_interval, "signed" if self._auth_secret else "unsigned")
        try:
            while max_tasks is None or self.served < max_tasks:
                res = poller.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    continue  # a round's next message is usually waiting already
                time.sleep(self.poll_interval)
        finally:
            poller.close()

    def app_for(self, fab: Fab) -> ClientApp:
        """The site's fedimg ClientApp, if ``fab`` carries the same fedimg sources."""
        if fab.hash_str not in self.checked:
            same = fab_digest(fab.content) == self._installed
            self.checked[fab.hash_str] = "" if same else (
                "the submitted app is not the fedimg installed at this site (its fedimg "
                "sources differ); the warm executor only runs the installed fedimg. Fix: "
                "install the coordinator's fedimg version at the site, or set warm: false "
                "in the site config")
        if self.checked[fab.hash_str]:
            raise LoadClientAppError(self.checked[fab.hash_str])
        return client_app.app

    def run_task(self, token: str) -> None:
        """Run one ClientApp task: pull its message, call the app, push the reply."""
        started = time.perf_counter()
        client = _client(self.address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, _, fab = pull_task_input(client)
            reply = self.app_for(fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - reported to the server as the task's error
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(exc)}:<'{exc}'>"
            log.error("ClientApp raised an exception", exc_info=exc)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            self._finish(client, heartbeat, reply=reply, context=context, status=status,
                         details=details)
        self.served += 1
        log.info("task %d done in %.2fs (%s)", self.served, time.perf_counter() - started,
                 status)

    @staticmethod
    def _finish(client: RuntimeHttpClient, heartbeat: HeartbeatSender, *,
                reply: Message | None, context: Context | None, status: str,
                details: str) -> None:
        """Push the reply and the task's status; never raise (the next task must run)."""
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as exc:  # noqa: BLE001 - as flwr-clientapp: logged, task failed
            log.error("failed to push the reply", exc_info=exc)
            status, details = SubStatus.FAILED, f"pushing the reply failed: {exc}"
        if heartbeat.is_running:
            heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()


def watch(command: Sequence[str]) -> subprocess.Popen:
    """Start the SuperNode ``command``; when it exits, exit this process with its code.

    The client daemon supervises this process as it would the SuperNode itself: the
    SuperNode's output (which the daemon reads) goes to the same stdout, and its exit
    code (a restarted SuperLink, a refused key) becomes this process's.
    """
    proc = subprocess.Popen(list(command))

    def _follow() -> None:
        code = proc.wait()
        logging.shutdown()
        os._exit(code)  # the serving loop (main thread) may be mid-poll: end it too

    threading.Thread(target=_follow, daemon=True, name="supernode-watch").start()
    return proc


def read_secret(path: Path) -> bytes:
    """The SuperExec secret in ``path`` (raw bytes, as Flower reads it); a ConfigError."""
    try:
        secret = load_superexec_auth_secret(str(path))
    except ValueError as exc:
        raise ConfigError(f"SuperExec secret file {path}: {exc}. Fix: pass the file given to "
                          "flower-supernode --superexec-auth-secret-file (fedimg-client "
                          "writes one at each start).") from exc
    assert secret is not None
    return secret


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedimg.deploy.warm --runtime-api-address 127.0.0.1:9094 [-- SUPERNODE...]``.

    After ``--`` comes a ``flower-supernode ... --isolation process`` command line to
    start and watch (the client daemon passes it); without one, it serves an already
    running SuperNode. ``--superexec-auth-secret-file F`` (the SuperNode's own flag)
    signs the executor's ``AcquireTask`` requests.
    """
    argv = list(argv) if argv is not None else sys.argv[1:]
    supernode = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S)
    parser.add_argument("--superexec-auth-secret-file", type=Path,
                        help="sign AcquireTask with this secret (the SuperNode's file)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    try:
        secret = (read_secret(args.superexec_auth_secret_file)
                  if args.superexec_auth_secret_file else None)
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    if supernode:
        watch(supernode)
    WarmExecutor(args.runtime_api_address, poll_interval=args.poll_interval,
                 auth_secret=secret).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
