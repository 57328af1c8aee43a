"""The coordinator's launcher: ``fedimg-server certs | superlink | register | run``.

* ``certs --out DIR --host H --node NAME``: development PKI (:mod:`fedimg.deploy.certs`).
* ``superlink --config server/server.yaml`` (or ``--certs DIR --keys DIR --host --port
  [--internal-port]``): start three supervised children, in this order:

  1. ``flower-superlink`` with TLS and SuperNode authentication on
     ``127.0.0.1:<internal_port>`` only (:func:`superlink_command`), with
     ``--isolation process`` and a per-start ``--superexec-auth-secret-file``;
  2. ``flower-superexec`` (:func:`superexec_command`), which launches the
     ServerApps and signs its ``AcquireTask`` requests with that secret, so no
     other local process can take the SuperLink's tasks;
  3. nginx on the sites' ``host:port`` (:mod:`fedimg.deploy.proxy`), forwarding
     only the Fleet API. The Control API (``flwr run``, ``flwr supernode
     register``) and the Runtime API stay on loopback.

  Once both ports answer, write the ``[superlink.<name>]`` connection (loopback)
  into ``$FLWR_HOME/config.toml`` (:func:`~fedimg.deploy.flwr_cli.write_connection`)
  and register every
  ``*.pub`` in the keys folder over it, then supervise in the foreground:
  SIGTERM/SIGINT stop all three; a child that ends by itself stops the others and
  its exit code (1 for a clean exit) is ours. An in-memory SuperLink forgets
  registrations when it stops, so they are redone at every start.
* ``register [--connection fedimg] KEY.pub ... | --keys DIR``: register node keys
  with a running SuperLink. A key registered before is reported, not an error:
  Flower answers "Public key already in use" (API code 23) and keeps the old node.
* ``run scenario=medical [key=value ...] [--connection fedimg] [--runs-dir DIR]``:
  validate the config here (a bad key exits 2 before anything is submitted), then
  ``flwr run <source checkout> <connection> --stream`` and print the run folder.
  Run it on the SuperLink's host: the ServerApp writes the run folder there.

What talks to the ``flwr`` CLI (the connection, key registration, run submission) is
:mod:`fedimg.deploy.flwr_cli`; this module owns the config and the three processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fedimg.deploy.client import executable
from fedimg.deploy.processes import (
    private_dir,
    start,
    stop_group,
    stop_on_signals,
    write_secret,
)
from fedimg.deploy.proxy import (
    ProxySettings,
    certificate_names,
    check_config,
    start_proxy,
    upstream_name,
)
from fedimg.deploy.flwr_cli import (
    flower_env,
    key_files,
    register_keys,
    submit_run,
    write_connection,
)
from fedimg.deploy.site import check_keys, read_yaml_mapping, split_address, typed
from fedimg.errors import ConfigError, FedimgError

log = logging.getLogger(__name__)

PORT_TIMEOUT_S = 60.0
CERT_FILES = ("ca.crt", "server.crt", "server.key")
_CONNECTION_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SPEC = {"name": "str", "host": "str", "port": "int", "certs": "path", "keys": "path?",
         "runs_dir": "path", "database": "path?", "cli_address": "str?",
         "internal_port": "int?"}


@dataclass(frozen=True)
class ServerConfig:
    """The SuperLink of one federation (``server/server.yaml``)."""

    certs: Path  # ca.crt, server.crt, server.key
    name: str = "fedimg"  # flwr connection name
    host: str = "0.0.0.0"  # nginx listens here: what the sites dial
    port: int = 9092
    keys: Path | None = None  # folder of the sites' <name>.pub keys
    runs_dir: Path = Path("runs/deployed")
    database: Path | None = None  # None: in-memory
    cli_address: str | None = None  # what flwr dials; None: 127.0.0.1:<internal port>
    internal_port: int | None = None  # the SuperLink on 127.0.0.1; None: port + 1

    @property
    def loopback_port(self) -> int:
        """The SuperLink's own port, on 127.0.0.1 only (``internal_port``, else port + 1)."""
        return self.internal_port or self.port + 1

    @property
    def internal_address(self) -> str:
        """The SuperLink itself: all three APIs, reachable on this host only."""
        return f"127.0.0.1:{self.loopback_port}"

    @property
    def public_address(self) -> str:
        """What the sites dial (nginx; the Fleet API only)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """The address the flwr CLI on this host dials (must be in server.crt's SANs)."""
        return self.cli_address or self.internal_address


def load_server_config(path: str | Path) -> ServerConfig:
    """Read and validate ``server.yaml``; relative paths start at its folder."""
    path = Path(path).expanduser().resolve()
    raw, where = read_yaml_mapping(path, what="server config"), f"server config {path}"
    check_keys(raw, _SPEC, where=where, required=("certs",))
    values = {k: typed(v, _SPEC[k], where=where, key=k, base=path.parent)
              for k, v in raw.items() if v is not None}
    return checked(ServerConfig(**values), where=where)


def checked(cfg: ServerConfig, *, where: str) -> ServerConfig:
    """``cfg`` if its name, port and addresses are valid; a ConfigError otherwise."""
    if not _CONNECTION_RE.match(cfg.name):
        raise ConfigError(f"{where}: name '{cfg.name}' is not a valid connection name. Fix: "
                          "use letters, digits, '_' and '-' (e.g. fedimg).")
    split_address(cfg.public_address, where=where, key="host/port")
    split_address(cfg.internal_address, where=where, key="internal_port")
    if cfg.loopback_port == cfg.port:
        raise ConfigError(f"{where}: internal_port {cfg.loopback_port} equals port: nginx "
                          "takes port, the SuperLink needs another. Fix: pick a free port, e.g. "
                          f"internal_port: {cfg.port + 1}, or leave it null (port + 1).")
    if cfg.cli_address and split_address(cfg.cli_address, where=where,
                                         key="cli_address")[1] == cfg.port:
        raise ConfigError(f"{where}: cli_address {cfg.cli_address} dials the public port "
                          f"{cfg.port}, where nginx refuses the Control API that flwr uses. "
                          f"Fix: use 127.0.0.1:{cfg.loopback_port} (the default, null).")
    return cfg


def check_certs(cfg: ServerConfig) -> None:
    """A ConfigError unless the certs folder holds the three files and names 127.0.0.1."""
    missing = [str(cfg.certs / f) for f in CERT_FILES if not (cfg.certs / f).is_file()]
    if missing:
        raise ConfigError(f"certificate file(s) {', '.join(missing)} do not exist. Fix: create "
                          f"them (fedimg-server certs --out {cfg.certs} --host <server name>) "
                          "or point certs at the folder holding ca.crt, server.crt, server.key.")
    if "127.0.0.1" not in certificate_names(cfg.certs / "server.crt")[1]:
        raise ConfigError(f"{cfg.certs / 'server.crt'} does not name 127.0.0.1, which the "
                          "SuperExec, the ServerApps and the flwr CLI dial. Fix: reissue it "
                          f"with fedimg-server certs --out {cfg.certs} --host <server name> "
                          "--host 127.0.0.1 --force.")


def superlink_command(cfg: ServerConfig, *, secret_file: Path) -> list[str]:
    """``flower-superlink`` on loopback with TLS, node auth and no runtime ``uv sync``.

    ``--isolation process`` leaves launching ServerApps to our own ``flower-superexec``
    (:func:`superexec_command`); only then does Flower check ``secret_file``.
    """
    check_certs(cfg)
    command = [executable("flower-superlink"),
               "--ssl-ca-certfile", str(cfg.certs / "ca.crt"),
               "--ssl-certfile", str(cfg.certs / "server.crt"),
               "--ssl-keyfile", str(cfg.certs / "server.key"),
               "--enable-supernode-auth", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(cfg.loopback_port),
               "--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
    return command + (["--database", str(cfg.database)] if cfg.database else [])


def superexec_command(cfg: ServerConfig, *, secret_file: Path) -> list[str]:
    """``flower-superexec`` running ServerApps for the loopback SuperLink (signed, no uv sync).

    It exits by itself when this launcher's process (``--parent-pid``) is gone.
    """
    return [executable("flower-superexec"), "--runtime-api-address", cfg.internal_address,
            "--root-certificates", str(cfg.certs / "ca.crt"), "--executor", "subprocess",
            "--superexec-auth-secret-file", str(secret_file), "--parent-pid", str(os.getpid())]


def proxy_settings(cfg: ServerConfig, *, runtime_dir: Path) -> ProxySettings:
    """What nginx needs to put the Fleet API of ``cfg``'s SuperLink on ``host:port``."""
    return ProxySettings(listen_host=cfg.host, listen_port=cfg.port,
                         upstream_port=cfg.loopback_port,
                         certificate=cfg.certs / "server.crt",
                         private_key=cfg.certs / "server.key",
                         ca_certificate=cfg.certs / "ca.crt", runtime_dir=runtime_dir,
                         upstream_name=upstream_name(cfg.certs / "server.crt"))


# --- superlink ----------------------------------------------------------------------

def wait_for_port(address: str, proc: subprocess.Popen, stop: threading.Event, *,
                  timeout_s: float = PORT_TIMEOUT_S) -> bool:
    """True once ``address`` accepts TCP connections; False if ``proc`` exits or ``stop``."""
    host, port = split_address(address, where="SuperLink", key="address")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard: dial loopback
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and not stop.is_set() and time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            stop.wait(0.3)
    return False


Children = dict[str, subprocess.Popen]


def _started(name: str, address: str, children: Children, stop: threading.Event) -> bool:
    """Wait for child ``name`` to open ``address``; if it does not, log why."""
    if wait_for_port(address, children[name], stop):
        return True
    if children[name].poll() is not None:
        log.error("%s exited with code %s before opening %s", name,
                  children[name].returncode, address)
    elif not stop.is_set():
        log.error("%s did not open %s within %.0fs", name, address, PORT_TIMEOUT_S)
    return False


def start_children(cfg: ServerConfig, *, runtime_dir: Path, children: Children,
                   stop: threading.Event) -> bool:
    """SuperLink (loopback) -> its port -> SuperExec + nginx -> the public port; True if up.

    Everything that can be checked is checked before the first start (certificates,
    nginx installed, ``nginx -t`` on the generated config): a ConfigError starts nothing.
    """
    secret = write_secret(runtime_dir)
    link = superlink_command(cfg, secret_file=secret)
    proxy = proxy_settings(cfg, runtime_dir=runtime_dir)
    check_config(proxy)
    log.info("starting SuperLink on loopback: %s", shlex.join(link))
    children["SuperLink"] = start(link, env=flower_env())
    if not _started("SuperLink", cfg.internal_address, children, stop):
        return False
    children["SuperExec"] = start(superexec_command(cfg, secret_file=secret), env=flower_env())
    children["nginx"] = start_proxy(proxy)
    return _started("nginx", cfg.public_address, children, stop)


def supervise_children(children: Children, stop: threading.Event) -> int | None:
    """Wait until ``stop`` (None) or until a child ends by itself (its code, 1 for 0)."""
    while not stop.wait(0.2):
        for name, proc in children.items():
            if proc.poll() is not None:
                log.error("%s exited with code %s; stopping the others", name,
                          proc.returncode)
                return proc.returncode or 1
    return None


def stop_children(children: Children) -> None:
    """Stop every child's process group: nginx first, the SuperLink last."""
    for name in reversed(list(children)):
        if children[name].poll() is None:
            log.info("stopping %s (pid %d)", name, children[name].pid)
        stop_group(children[name])


def serve(cfg: ServerConfig) -> int:
    """Start the SuperLink, its SuperExec and nginx, register keys, supervise; exit code."""
    keys = key_files(cfg.keys) if cfg.keys else []
    stop, children = threading.Event(), {}
    with private_dir(None, prefix="fedimg-superlink-") as runtime, stop_on_signals(stop):
        try:
            if not start_children(cfg, runtime_dir=runtime, children=children, stop=stop):
                return 0 if stop.is_set() else 1  # stopped by a signal while starting: 0
            write_connection(cfg.name, address=cfg.address,
                             root_certificates=cfg.certs / "ca.crt")
            failed = register_keys(keys, connection=cfg.name)
            log.info("SuperLink ready: sites dial %s (nginx, Fleet API only); flwr dials %s "
                     "(loopback); %d of %d node key(s) registered", cfg.public_address,
                     cfg.address, len(keys) - failed, len(keys))
            return supervise_children(children, stop) or 0
        finally:
            stop_children(children)


# --- CLI ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedimg-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("certs", help="development PKI (see fedimg-server certs --help)")
    link = sub.add_parser("superlink", help="start and supervise the SuperLink")
    link.add_argument("--config", type=Path, help="server YAML (server/server.yaml)")
    for flag, kind in (("--certs", Path), ("--keys", Path), ("--host", str), ("--port", int),
                       ("--internal-port", int), ("--name", str), ("--database", Path)):
        link.add_argument(flag, type=kind, help="overrides the config's value")
    reg = sub.add_parser("register", help="register node keys with a running SuperLink")
    reg.add_argument("public_keys", nargs="*", type=Path, metavar="KEY.pub")
    reg.add_argument("--keys", type=Path, help="register every *.pub in this folder")
    reg.add_argument("--connection", default="fedimg", help="flwr connection name")
    run = sub.add_parser("run", help="submit a run: scenario=NAME [key=value ...], or "
                         "resume=RUN_DIR [rounds=N]")
    run.add_argument("overrides", nargs="*", metavar="key=value")
    run.add_argument("--config", type=Path, help="take the connection and runs dir from it")
    run.add_argument("--connection", help="flwr connection name (default fedimg)")
    run.add_argument("--runs-dir", type=Path, help="parent of run folders (runs/deployed)")
    return parser


def _server_config(args: argparse.Namespace) -> ServerConfig:
    base = load_server_config(args.config) if args.config else None
    flags = {k: (v.expanduser().resolve() if isinstance(v, Path) else v)
             for k, v in vars(args).items() if k in _SPEC and v is not None}
    if base is None and "certs" not in flags:
        raise ConfigError("superlink needs --config server/server.yaml or --certs DIR. Fix: "
                          "pass one (fedimg-server certs --out DIR makes a development PKI).")
    cfg = replace(base, **flags) if base else ServerConfig(**flags)
    return checked(cfg, where="fedimg-server superlink")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "superlink":
        return serve(_server_config(args))
    if args.command == "register":
        keys = [*args.public_keys, *(key_files(args.keys) if args.keys else [])]
        if not keys:
            raise ConfigError("register needs KEY.pub files or --keys DIR. Fix: pass them.")
        failed = register_keys(keys, connection=args.connection)
        return ConfigError.exit_code if failed else 0
    cfg = load_server_config(args.config) if args.config else None
    return submit_run(args.overrides, connection=args.connection or (cfg.name if cfg else "fedimg"),
                      runs_dir=args.runs_dir or (cfg.runs_dir if cfg else Path("runs/deployed")))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point of ``fedimg-server``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        from fedimg.deploy.certs import main as certs_main

        return certs_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except FedimgError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
