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
  into ``$FLWR_HOME/config.toml`` (:func:`write_connection`) and register every
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
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import fedimg
from fedimg.deploy.client import (
    executable,
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
from fedimg.deploy.site import check_keys, read_yaml_mapping, split_address, toml_string, typed
from fedimg.errors import ConfigError, FedimgError

if TYPE_CHECKING:
    from fedimg.config import FedimgConfig

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
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


# --- flwr connection and registration --------------------------------------------------

def flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr``: where ``config.toml`` lives."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def _without_table(text: str, name: str) -> str:
    """``text`` without the ``[superlink.<name>]`` table (and its sub-tables)."""
    own = re.compile(rf'^\s*\[\s*superlink\s*\.\s*("?){re.escape(name)}\1\s*(\..*)?\]\s*(#.*)?$')
    kept, skipping = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("["):
            skipping = bool(own.match(line))
        if not skipping:
            kept.append(line)
    return "\n".join(kept).rstrip()


def write_connection(name: str, *, address: str, root_certificates: Path,
                     home: Path | None = None) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``config.toml``, keeping every other table."""
    path = (home or flwr_home()) / "config.toml"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    table = {"address": address, "root-certificates": str(Path(root_certificates).resolve())}
    block = f"[superlink.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
    rest = _without_table(old, name)
    new = f"{rest}\n\n{block}" if rest else block
    try:
        parsed = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML after adding [superlink.{name}] ({exc}). "
                          "Fix: correct or move the file; flwr recreates a default.") from exc
    if parsed.get("superlink", {}).get(name) != table:
        raise ConfigError(f"{path} defines superlink '{name}' in a form this launcher cannot "
                          f"replace. Fix: delete its entry by hand and rerun.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)
    log.info("flwr connection '%s' -> %s in %s", name, address, path)
    return path


def register_key(public_key: Path, *, connection: str) -> str | None:
    """Register one node key; its node id, or None if the SuperLink already knows it."""
    if not public_key.is_file():
        raise ConfigError(f"public key {public_key} does not exist. Fix: pass the site's "
                          "<name>.pub (an OpenSSH EC public key line).")
    command = [executable("flwr"), "supernode", "register", str(public_key), connection,
               "--format", "json"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"registering {public_key}: no answer from connection '{connection}' "
                          "within 120s. Fix: check that the SuperLink is up.") from exc
    start = proc.stdout.find("{")
    try:
        reply = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if reply.get("success"):
        return str(reply["node-id"])
    message = str(reply.get("error-message") or proc.stderr or proc.stdout).strip()
    if "already in use" in message:
        return None
    raise ConfigError(f"registering {public_key} with connection '{connection}' failed: "
                      f"{message}. Fix: check the key file (an OpenSSH EC public key) and that "
                      "the SuperLink is running (fedimg-server superlink).")


def register_keys(keys: Sequence[Path], *, connection: str) -> int:
    """Register ``keys``, logging each node id; return how many failed."""
    failed = 0
    for key in keys:
        try:
            node_id = register_key(key, connection=connection)
        except ConfigError as exc:
            log.error("%s", exc)
            failed += 1
            continue
        log.info("%s: %s", key.name, f"node id {node_id}" if node_id
                 else "already registered (Flower keeps its node id)")
    return failed


def key_files(folder: Path) -> list[Path]:
    """The ``*.pub`` files of ``folder``; a ConfigError if it does not exist."""
    if not folder.is_dir():
        raise ConfigError(f"keys folder {folder} does not exist. Fix: collect the sites' "
                          "<name>.pub files there, or pass the key files themselves.")
    return sorted(folder.glob("*.pub"))


def _env() -> dict[str, str]:
    return {**os.environ, **FLOWER_ENV}


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
    children["SuperLink"] = start(link, env=_env())
    if not _started("SuperLink", cfg.internal_address, children, stop):
        return False
    children["SuperExec"] = start(superexec_command(cfg, secret_file=secret), env=_env())
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


# --- run ----------------------------------------------------------------------------

def app_dir() -> Path:
    """The source checkout holding fedimg's pyproject.toml (the Flower app for flwr run)."""
    root = Path(fedimg.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"fedimg is installed at {root} without its pyproject.toml, which "
                          "flwr run needs as the app. Fix: run fedimg-server from a source "
                          "checkout (pip install -e .).")
    return root


def run_config(scenario: str, overrides: Sequence[str]) -> str:
    """The ``--run-config`` value: ``scenario="..." overrides="k=v ..."``."""
    bad = [o for o in [scenario, *overrides] if '"' in o]
    if bad:
        raise ConfigError(f"argument(s) {bad} contain '\"', which flwr's --run-config cannot "
                          "carry. Fix: quote with single quotes, e.g. key='a b'.")
    return f"scenario={toml_string(scenario)} overrides={toml_string(shlex.join(overrides))}"


def submit_run(args: Sequence[str], *, connection: str, runs_dir: Path) -> int:
    """Validate ``scenario=... key=value ...`` here, submit it with ``flwr run``; its exit code.

    ``resume=<run_dir> [rounds=N ...]`` continues a deployed run from its last complete
    round instead: the run's saved config is checked here (a bad override exits 2),
    and the ServerApp matches the sites by name and leaves their ledgers to them.
    """
    scenario, overrides = _run_arguments(list(args), runs_dir=runs_dir)
    cfg = _checked_config(scenario, overrides)  # ConfigError before anything is submitted
    command = [executable("flwr"), "run", str(app_dir()), connection, "--stream",
               "--run-config", run_config(scenario, overrides)]
    log.info("submitting: %s", shlex.join(command))
    code = subprocess.run(command, cwd=app_dir(), env=_env(), check=False).returncode
    print(f"run directory: {cfg.output.run_dir}")  # noqa: T201 - the command's result
    return code or _run_outcome(Path(str(cfg.output.run_dir)))


def _run_outcome(run_dir: Path) -> int:
    """0 if the run wrote its results; else log why it failed (``flwr run`` exits 0 then)."""
    if (run_dir / "results.json").is_file():
        return 0
    log_file = run_dir / "run.log"
    lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
    reason = next((ln for ln in reversed(lines) if "Error" in ln and ": " in ln),
                  "no results.json was written")
    log.error("the run failed before its results: %s (full log: %s)", reason.strip()[:2000],
              log_file)
    return FedimgError.exit_code


def _run_arguments(args: list[str], *, runs_dir: Path) -> tuple[str, list[str]]:
    """The ``scenario`` and ``overrides`` the ServerApp gets (a new run's dir filled in)."""
    from fedimg.config.compose import split_argv

    resume = [a for a in args if a.startswith("resume=")]
    if resume:
        run_dir = Path(resume[-1].partition("=")[2]).expanduser().resolve()
        return "resume", [f"resume={run_dir}", *(a for a in args if a not in resume)]
    scenario, overrides = split_argv(args)
    if scenario.endswith((".yaml", ".yml")):
        scenario = str(Path(scenario).resolve())  # the ServerApp runs elsewhere
    if not any(o.lstrip("+").startswith(("output.run_dir=", "hydra.run.dir=")) for o in overrides):
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        run_dir = runs_dir.expanduser().resolve() / f"{Path(scenario).stem}-{stamp}"
        overrides = [f"output.run_dir={run_dir}", *overrides]
    return scenario, ["deploy.enabled=true", *overrides]


def _checked_config(scenario: str, overrides: list[str]) -> FedimgConfig:
    """The config the ServerApp will build, composed and validated here first."""
    from fedimg.serverapp.checkpoint import config_from_argv

    if scenario == "resume":
        cfg, _ = config_from_argv(overrides)
        if not cfg.deploy.enabled:
            raise ConfigError(f"{cfg.output.run_dir} is a simulation, not a deployed run. "
                              "Fix: resume it with python -m fedimg.simulate resume=<run_dir>")
        return cfg
    cfg, _ = config_from_argv([f"scenario={scenario}", *overrides])
    return cfg


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
