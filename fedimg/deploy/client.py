"""The client daemon: ``fedimg-client --site clients/sites/hospital_a.yaml [--check]``.

1. Load the site config (:mod:`fedimg.deploy.site`; a bad key exits 2).
2. Read the local images against the federation's classes before joining
   (unknown class folders, unreadable files, too few images exit 3, naming them);
   log a summary. ``--check`` stops here with 0: run it before asking to register.
3. Run ``flower-supernode`` (TLS + node authentication, :func:`supernode_command`)
   as a child in its own process group and forward its output to stdout. A warm
   site's SuperNode and executor share a secret made at each start
   (:func:`write_secret`, mode 0600 in :func:`private_dir`), with which the executor
   signs its ``AcquireTask`` requests; no other local process can take the tasks.
4. Supervise it (:func:`supervise`): SIGTERM/SIGINT stop the whole group and exit 0.
   A SuperNode whose key the server does not know ("Failed to activate SuperNode",
   Flower exit code 305) exits 10 without a restart, unless this daemon was connected
   before (then the SuperLink has just restarted and is re-registering keys). A TLS
   rejection (wrong ``ca_certificate``) exits 2. Any other exit, including the
   clean exit Flower makes when a restarted in-memory SuperLink no longer knows the
   node, is restarted after ``reconnect.backoff_s``; after ``reconnect.max_wait_s``
   without a working connection the daemon exits 11. With ``limits.memory_gb``, a
   SuperNode whose process group (ClientApps included) grows past it is stopped and
   restarted the same way.

Flower's own process exit code is 1 for every error (its codes such as 305 appear
only in its log), so outcomes are read from the output, see :data:`MARKERS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedimg.deploy.processes import (
    private_dir,
    run_until_stopped,
    start,
    stop_on_signals,
    write_secret,
)
from fedimg.deploy.site import (
    ReconnectPolicy,
    SiteConfig,
    federation_classes,
    load_site_config,
    node_config,
)
from fedimg.errors import ConfigError, FedimgError

log = logging.getLogger(__name__)

EXIT_UNREGISTERED = 10  # the server does not know this node's key
EXIT_GAVE_UP = 11  # reconnect.max_wait_s passed without a working connection
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
# What Flower prints for each outcome (its exit status is 1 for all errors).
MARKERS = {"unregistered": "Failed to activate SuperNode",
           "tls": "CERTIFICATE_VERIFY_FAILED",
           "connected": "SuperNode ID:",
           "gave_up": "Giving up reconnection"}  # after --max-wait-time
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- one SuperNode run ----------------------------------------------------------------

@dataclass
class _Outcome:
    """How one child run ended: exit code (None: stopped by us) and markers seen."""

    returncode: int | None = None
    seen: set[str] = field(default_factory=set)
    last_line: str = ""


def _forward(stream: Iterator[str], outcome: _Outcome, echo: Callable[[str], None]) -> None:
    for line in stream:
        line = _ANSI.sub("", line)
        echo(line)
        outcome.seen.update(k for k, marker in MARKERS.items() if marker in line)
        if line.strip():
            outcome.last_line = line.strip()


def _echo(line: str) -> None:
    sys.stdout.write(line)  # the SuperNode's own log, streamed (journald keeps it)
    sys.stdout.flush()


def _run_once(command: Sequence[str], *, env: Mapping[str, str] | None, stop: threading.Event,
              memory_bytes: int | None) -> _Outcome:
    outcome = _Outcome()
    proc = start(command, env=env, stdout=subprocess.PIPE)
    reader = threading.Thread(target=_forward, args=(proc.stdout, outcome, _echo), daemon=True)
    reader.start()
    outcome.returncode = run_until_stopped(proc, stop, memory_bytes=memory_bytes)
    reader.join(timeout=5)
    return outcome


def supervise(command: Sequence[str], *, reconnect: ReconnectPolicy | None = None,
              env: Mapping[str, str] | None = None, memory_bytes: int | None = None,
              public_key: str = "<node>.pub") -> int:
    """Run ``command`` until stopped, restarting it per ``reconnect``; return the exit code."""
    reconnect = reconnect or ReconnectPolicy()
    stop, connected, failing_since = threading.Event(), False, None
    refused_since: float | None = None  # first "not registered" answer before connecting
    with stop_on_signals(stop):
        while True:
            started = time.monotonic()
            out = _run_once(command, env=env, stop=stop, memory_bytes=memory_bytes)
            if out.returncode is None or stop.is_set():
                return 0
            if "tls" in out.seen:
                log.error("TLS rejected the SuperLink's certificate: it is not signed by this "
                          "site's ca_certificate, or does not name the host dialled. Fix: "
                          "install the coordinator's ca.crt; dial a host in its certificate")
                return ConfigError.exit_code
            if "unregistered" in out.seen and not connected:
                refused_since = refused_since or started
                if time.monotonic() - refused_since >= reconnect.activation_grace_s:
                    log.error("node key not registered at the server: ask the coordinator to "
                              "run `fedimg-server register --connection fedimg %s`, then start "
                              "again", public_key)
                    return EXIT_UNREGISTERED
            if "connected" in out.seen:
                connected, failing_since = True, time.monotonic()
            failing_since = failing_since or started
            waited = time.monotonic() + reconnect.backoff_s - failing_since
            if reconnect.max_wait_s is not None and (waited > reconnect.max_wait_s
                                                     or "gave_up" in out.seen):
                log.error("no working connection within reconnect.max_wait_s=%ss; giving up. "
                          "Last output: %s", reconnect.max_wait_s, out.last_line)
                return EXIT_GAVE_UP
            log.warning("SuperNode exited with code %s (%s); restarting in %.0fs",
                        out.returncode, out.last_line or "no output", reconnect.backoff_s)
            if stop.wait(reconnect.backoff_s):
                return 0


# --- the daemon -----------------------------------------------------------------------

def executable(name: str) -> str:
    """``name`` beside this Python (same virtualenv), else as found on PATH."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.is_file() else name


def supernode_command(site: SiteConfig, *, secret_file: Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line of ``site`` (TLS and node auth, never insecure).

    A ``warm`` site runs it with ``--isolation process`` under :mod:`fedimg.deploy.warm`,
    whose one long-lived process serves every ClientApp message. With ``secret_file``
    both get ``--superexec-auth-secret-file``: the SuperNode then serves its Runtime
    API's ``AcquireTask`` only to requests HMAC-signed with that secret, i.e. to the
    warm executor and no other local process. A ``warm: false`` site (Flower's
    subprocess isolation) ignores ``secret_file``, as Flower would.
    """
    command = [executable("flower-supernode"), "--superlink", site.superlink,
               "--root-certificates", str(site.ca_certificate),
               "--auth-supernode-private-key", str(site.private_key),
               "--node-config", node_config(site), "--port", str(site.port)]
    if site.reconnect.max_wait_s is not None:
        command += ["--max-wait-time", f"{site.reconnect.max_wait_s:g}"]
    if site.warm:
        secret = ["--superexec-auth-secret-file", str(secret_file)] if secret_file else []
        command = [sys.executable, "-m", "fedimg.deploy.warm", "--runtime-api-address",
                   f"127.0.0.1:{site.port}", *secret, "--", *command,
                   "--isolation", "process", *secret]
    return command


def supernode_env(site: SiteConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The SuperNode's environment: Flower switches, thread limits, cache dir, venv on PATH."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if site.limits.num_threads > 0:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(site.limits.num_threads)
    if site.state_dir is not None:
        env["FEDIMG_CACHE"] = str(site.state_dir / "cache")
    return env


def check_site_data(site: SiteConfig) -> None:
    """Read the site's images as the ClientApp will; log a summary; DataError if unfit."""
    from fedimg.resolve import compose_and_check
    from fedimg.data.site import read_site_data, site_fingerprint

    cfg = compose_and_check(site.scenario, [])
    classes = federation_classes(site)
    data = read_site_data(site.data, classes=classes, image_size=cfg.data.image_size,
                          min_samples=site.limits.min_samples,
                          val_fraction=cfg.data.val_fraction, seed=cfg.seed, on_corrupt="refuse",
                          max_samples=site.limits.max_samples)
    counts = ", ".join(f"{c}={n}" for c, n in zip(classes, data.label_counts))
    log.info("site %s: %s: %d training + %d validation images; training per class: %s; "
             "fingerprint %s", site.name, data.location, len(data.train), len(data.val),
             counts, site_fingerprint(site.data))
    for warning in data.warnings:
        log.warning("site %s: %s", site.name, warning)
    check_site_ledger(site)


def check_site_ledger(site: SiteConfig) -> None:
    """Open the site's own privacy ledger (LedgerError if missing or corrupt); log its spend."""
    from fedimg.privacy.site_ledger import LifetimeBudget, SiteLedger

    book = SiteLedger.open(site.ledger_dir, federation=site.federation_key, site=site.name)
    policy = site.policy
    if policy.lifetime_epsilon is None or not book.runs:
        log.info("site %s: privacy ledger %s: %d run(s) on record", site.name, book.path,
                 len(book.runs))
        return
    budget = LifetimeBudget(policy.lifetime_epsilon, policy.lifetime_delta)
    accountant = next(iter(book.runs.values()))["accountant"]
    log.info("site %s: privacy ledger %s: %d run(s), lifetime epsilon %.3f of %g (delta %g)",
             site.name, book.path, len(book.runs),
             book.lifetime_spent(budget, accountant=accountant), budget.epsilon, budget.delta)


def warn_if_key_exposed(site: SiteConfig) -> bool:
    """Log a warning if the node's private key is readable by group or others; True then."""
    try:
        mode = site.private_key.stat().st_mode & 0o777
    except OSError:
        return False  # load_site_config has named a missing key already
    if mode & 0o077:
        log.warning("site %s: private key %s has mode %o: other users can read it and join "
                    "the federation as this site. Fix: chmod 600 %s", site.name,
                    site.private_key, mode, site.private_key)
        return True
    return False


def run_site(site: SiteConfig, *, check_only: bool = False) -> int:
    """Check the data, then (unless ``check_only``) run and supervise the SuperNode."""
    warn_if_key_exposed(site)
    if site.state_dir is not None:
        try:
            (site.state_dir / "cache").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"site config {site.source}: state_dir {site.state_dir} cannot "
                              f"be created ({exc}). Fix: create it writable for this user, "
                              "or point state_dir elsewhere.") from exc
        os.environ["FEDIMG_CACHE"] = str(site.state_dir / "cache")  # the check's cache too
    check_site_data(site)
    if check_only:
        log.info("site %s: data OK; node public key to register: %s", site.name,
                 site.public_key)
        return 0
    if not site.warm:
        log.info("site %s: warm: false runs Flower's own ClientApp executor (subprocess "
                 "isolation), which ignores a SuperExec secret: its Runtime API on "
                 "127.0.0.1:%d hands tasks to any local process. warm: true signs them.",
                 site.name, site.port)
    with private_dir(site.state_dir, prefix=f"fedimg-{site.name}-") as runtime:
        secret = write_secret(runtime) if site.warm else None
        command = supernode_command(site, secret_file=secret)
        log.info("starting SuperNode %s -> %s: %s", site.name, site.superlink,
                 shlex.join(command))
        memory = site.limits.memory_gb
        return supervise(command, reconnect=site.reconnect, env=supernode_env(site),
                         memory_bytes=int(memory * 2**30) if memory else None,
                         public_key=str(site.public_key))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point of ``fedimg-client``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="fedimg-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, required=True, help="site YAML file")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and local data, then exit (starts nothing)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    try:
        return run_site(load_site_config(args.site), check_only=args.check)
    except FedimgError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
