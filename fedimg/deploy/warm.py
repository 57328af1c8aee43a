"""A warm ClientApp executor for a deployed SuperNode: one process serves every message.

By default a Flower 1.41 SuperNode starts a fresh ``flwr-clientapp`` process for
every message it receives. Each one imports torch, Flower and fedimg, unpacks the
app bundle, reads the site's images and builds the network before it trains for
a second or two; here that start-up took about 7 s of every message
(BENCHMARKS.md §8).

Flower leaves the executor pluggable: a SuperNode started with
``--isolation process`` runs no executor of its own, and any process that polls its
Runtime API (``AcquireTask``) may take the tasks. This module is such a process.
It polls every ``poll_interval`` seconds and runs each ClientApp task in itself,
with the steps ``flwr-clientapp`` runs (Flower's own ``pull_task_input``,
``push_message`` and ``push_task_output``), but without exiting afterwards. The
imports, the decoded site data and the model (``fedimg.task.site_environment``)
therefore stay in memory between messages and rounds.

Isolation is what this trades: every run's ClientApp shares the process, so a
site should use it for the fedimg app only (``fedimg-client`` runs it; set
``warm: false`` in the site config for Flower's process per message). A task that
raises is reported as failed, like in ``flwr-clientapp``, and the executor goes on.
Built against flwr 1.41.0 (pinned in pyproject.toml); its Runtime API internals may
change in other versions.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 0.1


def _client(address: str, component: str, token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


class WarmExecutor:
    """Takes ClientApp tasks from a SuperNode's Runtime API and runs them in-process."""

    def __init__(self, runtime_address: str, *, poll_interval: float = DEFAULT_POLL_S) -> None:
        self.address = runtime_address
        self.poll_interval = poll_interval
        self.apps: dict[str, ClientApp] = {}  # FAB hash -> loaded ClientApp
        self.served = 0
        self._load: Callable[..., ClientApp] = get_load_client_app_fn(
            default_app_ref="", app_path=None, multi_app=True)

    def serve(self, *, max_tasks: int | None = None) -> None:
        """Poll for tasks and run them until stopped (or after ``max_tasks``)."""
        poller = _client(self.address, "SuperExec")
        log.info("warm executor polling %s every %.2fs", self.address, self.poll_interval)
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

    def _app(self, fab_hash: str, fab_id: str, fab_version: str, content: bytes) -> ClientApp:
        if fab_hash not in self.apps:
            install_from_fab(content, skip_prompt=True)
            self.apps[fab_hash] = self._load(fab_id, fab_version, fab_hash)
        return self.apps[fab_hash]

    def run_task(self, token: str) -> None:
        """Run one ClientApp task: pull its message, call the app, push the reply."""
        started = time.perf_counter()
        client = _client(self.address, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            app = self._app(fab.hash_str, run.fab_id, run.fab_version, fab.content)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - reported to the server as the task's error
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(exc)}:<'{exc}'>"
            log.error("ClientApp raised an exception", exc_info=exc)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                push_task_output(client=client, context=context, sub_status=status,
                                 details=details)
                heartbeat.stop()
                client.close()
        self.served += 1
        log.info("task %d done in %.2fs (%s)", self.served, time.perf_counter() - started,
                 status)


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedimg.deploy.warm --runtime-api-address 127.0.0.1:9094 [-- SUPERNODE...]``.

    After ``--`` comes a ``flower-supernode ... --isolation process`` command line to
    start and watch (the client daemon passes it); without one, it serves an already
    running SuperNode.
    """
    argv = list(argv) if argv is not None else sys.argv[1:]
    supernode = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_S)
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    if supernode:
        watch(supernode)
    WarmExecutor(args.runtime_api_address, poll_interval=args.poll_interval).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
