"""The flwr CLI on the coordinator: the loopback connection, node keys, run submission.

* :func:`write_connection`: the ``[superlink.<name>]`` connection in
  ``$FLWR_HOME/config.toml`` that ``flwr`` dials (the SuperLink's loopback address).
* :func:`register_keys`: ``flwr supernode register`` for every site key; a key known
  already is reported, not an error.
* :func:`submit_run`: ``fedimg-server run``. It validates the config here (a bad key
  exits 2 before anything is submitted), runs ``flwr run <source checkout>
  <connection> --stream``, prints the run folder, and exits 1 with the failing log line
  when the run wrote no results (``flwr run`` itself exits 0 then).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import fedimg
from fedimg.deploy.client import executable
from fedimg.deploy.site import toml_string
from fedimg.errors import ConfigError, FedimgError

if TYPE_CHECKING:
    from fedimg.config import FedimgConfig

log = logging.getLogger(__name__)

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


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
        proc = subprocess.run(command, capture_output=True, text=True, env=flower_env(),
                              timeout=120, check=False)
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


def flower_env() -> dict[str, str]:
    """This process's environment, with Flower's telemetry and update checks off."""
    return {**os.environ, **FLOWER_ENV}


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
    code = subprocess.run(command, cwd=app_dir(), env=flower_env(), check=False).returncode
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
