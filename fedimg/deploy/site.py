"""A site's deployment config (``clients/sites/<name>.yaml``) and what Flower gets from it.

One YAML file describes one client daemon: who it is (``name``), which
SuperLink it dials (``superlink``, TLS ``ca_certificate``, auth ``private_key``),
where its images are (``data``) and which federation they must fit
(``scenario``, or an explicit ``classes`` list). :func:`load_site_config` checks
every key before anything starts; each problem is a :class:`ConfigError` naming
the file, the key, the bad value and the fix. Relative paths resolve against the
YAML file's folder, so a site folder can be moved as a whole.

:func:`node_config` is the one place where these snake_case settings become the
kebab-case ``--node-config`` keys read by the ClientApp
(:func:`fedimg.clientapp.site.site_options`).

The small YAML helpers at the bottom (:func:`read_yaml_mapping`,
:func:`check_keys`, :func:`typed`) are shared with the server config
(:mod:`fedimg.deploy.server`).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimg.clientapp.policy import NEVER_ACCEPT, SitePolicy
from fedimg.clientapp.site import policy_node_config
from fedimg.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")
REQUIRED = ("name", "superlink", "ca_certificate", "private_key", "data")

# key -> kind; kinds are checked by :func:`typed`.
_TOP = {"name": "str", "superlink": "str", "ca_certificate": "path", "private_key": "path",
        "data": "path", "scenario": "str", "classes": "str_list", "device": "str",
        "port": "int", "state_dir": "path?", "warm": "bool", "limits": "mapping",
        "reconnect": "mapping", "federation": "str", "policy": "mapping"}
_LIMITS = {"num_threads": "int", "max_samples": "int?", "min_samples": "int",
           "memory_gb": "number?"}
_RECONNECT = {"max_wait_s": "number?", "backoff_s": "number", "activation_grace_s": "number"}
_POLICY = {"require_dp": "bool", "max_run_epsilon": "number?", "lifetime_epsilon": "number?",
           "lifetime_delta": "number", "min_noise_multiplier": "number?",
           "min_batch_size": "int", "never_accept": "str_list"}


@dataclass(frozen=True)
class SiteLimits:
    """Resource limits of one site's SuperNode and its ClientApps."""

    num_threads: int = 0  # torch/OpenMP threads; 0 = the library default
    max_samples: int | None = None  # cap on training images (stratified); None = all
    min_samples: int = 16  # fewer training images: refuse to join
    memory_gb: float | None = None  # resident memory of SuperNode + ClientApps; over it: restart


@dataclass(frozen=True)
class ReconnectPolicy:
    """How the daemon restarts a SuperNode that exited (see fedimg.deploy.client)."""

    max_wait_s: float | None = None  # give up after this long without the server; None = never
    backoff_s: float = 10.0  # pause before each restart
    # Flower refuses to activate a node it still counts as online (up to 2 heartbeat
    # intervals, 60 s, after an unclean death) with the same message as an unknown key,
    # so "not registered" is believed only after it persists this long.
    activation_grace_s: float = 75.0


@dataclass(frozen=True)
class SiteConfig:
    """One site's client daemon: identity, server, credentials, data and limits."""

    name: str
    superlink: str  # host:port
    ca_certificate: Path
    private_key: Path
    data: Path
    scenario: str = "medical"
    classes: tuple[str, ...] = ()  # empty: the scenario dataset's classes
    device: str = "auto"
    port: int = 9094
    state_dir: Path | None = None  # None: the user cache dir ($FEDIMG_CACHE / XDG)
    warm: bool = True  # one ClientApp process for all messages (fedimg.deploy.warm)
    limits: SiteLimits = field(default_factory=SiteLimits)
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    federation: str = ""  # the privacy ledger's key; "" = the superlink address
    policy: SitePolicy = field(default_factory=SitePolicy)
    source: Path | None = None  # the YAML file it was read from

    @property
    def ledger_dir(self) -> Path:
        """Where the site keeps its privacy ledger: ``state_dir``, else the user's state dir."""
        if self.state_dir is not None:
            return self.state_dir
        base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
        return Path(base).expanduser() / "fedimg" / self.name

    @property
    def federation_key(self) -> str:
        """The federation this site's budget is spent in (``federation``, else the address)."""
        return self.federation or self.superlink

    @property
    def public_key(self) -> Path:
        """The ``.pub`` beside the private key: what the coordinator registers."""
        return self.private_key.with_suffix(".pub")


def load_site_config(path: str | Path, *, check_files: bool = True) -> SiteConfig:
    """Read and validate a site YAML; ``check_files=False`` skips the CA/key existence check."""
    path = Path(path).expanduser().resolve()
    raw = read_yaml_mapping(path, what="site config")
    where = f"site config {path}"
    check_keys(raw, _TOP, where=where, required=REQUIRED)
    values = {k: typed(v, _TOP[k], where=where, key=k, base=path.parent) for k, v in raw.items()}
    values["limits"] = _section(raw, "limits", _LIMITS, SiteLimits, where=where)
    values["reconnect"] = _section(raw, "reconnect", _RECONNECT, ReconnectPolicy, where=where)
    values["policy"] = _policy(raw, where=where)
    if "classes" in values:
        values["classes"] = tuple(values["classes"])
    site = SiteConfig(**values, source=path)
    _check_values(site, where=where)
    if check_files:
        _check_files(site, where=where)
    return site


def _section(raw: Mapping[str, Any], key: str, spec: Mapping[str, str], cls: type, *,
             where: str) -> Any:
    """A nested mapping (``limits``, ``reconnect``) as its frozen dataclass."""
    section = raw.get(key) or {}
    check_keys(section, spec, where=where, prefix=f"{key}.")
    return cls(**{k: typed(v, spec[k], where=where, key=f"{key}.{k}")
                  for k, v in section.items()})


def _policy(raw: Mapping[str, Any], *, where: str) -> SitePolicy:
    """The ``policy:`` section as a :class:`SitePolicy`, its values checked."""
    policy = _section(raw, "policy", _POLICY, dict, where=where)
    if "never_accept" in policy:
        unknown = sorted(set(policy["never_accept"]) - set(NEVER_ACCEPT))
        if unknown:
            raise _fail(where, "policy.never_accept", f"unknown settings {unknown}",
                        f"list some of {', '.join(NEVER_ACCEPT)}")
        policy["never_accept"] = tuple(policy["never_accept"])
    site_policy = SitePolicy(**policy)
    for key in ("max_run_epsilon", "lifetime_epsilon", "min_noise_multiplier"):
        value = getattr(site_policy, key)
        if value is not None and value <= 0:
            raise _fail(where, f"policy.{key}", f"{value} is not positive",
                        "give a positive number or null (no limit)")
    if not 0 < site_policy.lifetime_delta < 1 or site_policy.min_batch_size < 1:
        raise _fail(where, "policy", f"lifetime_delta={site_policy.lifetime_delta}, "
                    f"min_batch_size={site_policy.min_batch_size}",
                    "use 0 < lifetime_delta < 1 and min_batch_size >= 1")
    if site_policy.lifetime_epsilon is not None and not site_policy.require_dp:
        raise _fail(where, "policy.lifetime_epsilon", "a lifetime budget needs require_dp: "
                    "true (a run without DP-SGD spends an unbounded epsilon)",
                    "add 'require_dp: true' to policy, or remove lifetime_epsilon")
    return site_policy


def _fail(where: str, key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {problem}. Fix: {fix}.")


def split_address(address: str, *, where: str, key: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port); a ConfigError otherwise."""
    host, sep, port = address.rpartition(":")
    fix = "write host:port without a scheme, e.g. fl.example.org:9092 or 10.0.0.5:9092"
    if not sep or not port.isdigit() or not _HOST_RE.match(host):
        raise _fail(where, key, f"'{address}' is not host:port", fix)
    if not 1 <= int(port) <= 65535:
        raise _fail(where, key, f"port {port} in '{address}' is outside 1..65535", fix)
    return host.strip("[]"), int(port)


def _check_values(site: SiteConfig, *, where: str) -> None:
    if not NAME_RE.match(site.name):
        raise _fail(where, "name", f"'{site.name}' is not a valid node name",
                    "use letters, digits, '_', '.', '-', starting with a letter or digit")
    split_address(site.superlink, where=where, key="superlink")
    if not DEVICE_RE.match(site.device):
        raise _fail(where, "device", f"'{site.device}' is unknown",
                    "use one of auto, cpu, cuda, cuda:N (e.g. cuda:0)")
    if not 1 <= site.port <= 65535:
        raise _fail(where, "port", f"{site.port} is outside 1..65535",
                    "pick a free local port, distinct per daemon on this host (e.g. 9094)")
    if len(set(site.classes)) != len(site.classes):
        raise _fail(where, "classes", f"{list(site.classes)} has duplicates", "list each once")
    if site.federation and not NAME_RE.match(site.federation):
        raise _fail(where, "federation", f"'{site.federation}' is not a valid name",
                    "use letters, digits, '_', '.', '-' (e.g. chest-xray-2027)")
    if '"' in str(site.data) or '"' in str(site.ledger_dir):
        raise _fail(where, "data", f"path {site.data} contains '\"'",
                    "rename the folder (Flower's --node-config cannot quote it)")
    _check_limits(site, where=where)


def _check_limits(site: SiteConfig, *, where: str) -> None:
    lim, rec = site.limits, site.reconnect
    if lim.num_threads < 0 or lim.min_samples < 1:
        raise _fail(where, "limits", f"num_threads={lim.num_threads}, min_samples="
                    f"{lim.min_samples}", "use num_threads >= 0 (0 = default), min_samples >= 1")
    if lim.max_samples is not None and lim.max_samples < lim.min_samples:
        raise _fail(where, "limits.max_samples", f"{lim.max_samples} is below min_samples="
                    f"{lim.min_samples}", "raise max_samples, lower min_samples, or use null")
    if lim.memory_gb is not None and lim.memory_gb <= 0:
        raise _fail(where, "limits.memory_gb", f"{lim.memory_gb} is not positive",
                    "use a size in GB (e.g. 3) or null for no limit")
    if rec.backoff_s < 0 or (rec.max_wait_s is not None and rec.max_wait_s <= 0):
        raise _fail(where, "reconnect", f"backoff_s={rec.backoff_s}, max_wait_s="
                    f"{rec.max_wait_s}", "use backoff_s >= 0 and max_wait_s > 0 or null")


def _check_files(site: SiteConfig, *, where: str) -> None:
    for key, path in (("ca_certificate", site.ca_certificate),
                      ("private_key", site.private_key)):
        if not path.is_file():
            raise _fail(where, key, f"file {path} does not exist",
                        "copy it there (the coordinator hands out ca.crt; the node key is "
                        "made on the site: python -m fedimg.deploy.certs), or fix the path "
                        "(relative paths start at the YAML file's folder)")


@functools.lru_cache(maxsize=8)
def _scenario_dataset(scenario: str) -> str:
    from fedimg.resolve import compose_and_check

    return compose_and_check(scenario, []).data.dataset


def federation_classes(site: SiteConfig) -> tuple[str, ...]:
    """The class names the site's data must use: ``classes``, else the scenario dataset's."""
    if site.classes:
        return site.classes
    from fedimg.data.sources import DATASETS

    dataset = _scenario_dataset(site.scenario)
    classes = tuple(DATASETS.get(dataset).classes)
    if not classes:
        raise ConfigError(f"site config {site.source}: scenario '{site.scenario}' uses dataset "
                          f"'{dataset}', which has no fixed class names. Fix: list them "
                          "under classes: [...] in the site config.")
    return classes


def toml_string(value: str) -> str:
    """A TOML basic string for Flower's --node-config parser (no '"' allowed inside)."""
    return '"' + value.replace("\\", "\\\\") + '"'


def node_config(site: SiteConfig) -> str:
    """The ``--node-config`` string, e.g. ``site="a" data-path="/abs" device="cpu" ...``."""
    parts = [f"site={toml_string(site.name)}",
             f"data-path={toml_string(str(Path(site.data).resolve()))}",
             f"device={toml_string(site.device)}",
             f"num-threads={site.limits.num_threads}",
             f"min-samples={site.limits.min_samples}"]
    if site.limits.max_samples is not None:
        parts.append(f"max-samples={site.limits.max_samples}")
    parts += [f"state-dir={toml_string(str(site.ledger_dir.resolve()))}",
              f"federation={toml_string(site.federation_key)}"]
    for key, value in policy_node_config(site.policy).items():
        text = toml_string(value) if isinstance(value, str) else (
            str(value).lower() if isinstance(value, bool) else repr(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


# --- YAML helpers shared with fedimg.deploy.server ------------------------------------

def read_yaml_mapping(path: Path, *, what: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a ConfigError for a missing/invalid/other file."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc}). Fix: check the path.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: invalid YAML ({exc}). Fix: correct the YAML "
                          "(indent with spaces, close brackets and quotes).") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: the top level is {type(raw).__name__}, not a "
                          "mapping of keys. Fix: write 'key: value' lines (see the examples).")
    return raw


def check_keys(raw: Any, spec: Mapping[str, str], *, where: str, prefix: str = "",
               required: tuple[str, ...] = ()) -> None:
    """Refuse a non-mapping, unknown keys (with a close match) and missing required keys."""
    if not isinstance(raw, dict):
        raise _fail(where, prefix.rstrip(".") or "top level", f"{raw!r} is not a mapping",
                    f"write it as {{{', '.join(f'{k}: ...' for k in spec)}}}")
    for key in raw:
        if key not in spec:
            close = difflib.get_close_matches(str(key), list(spec), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise _fail(where, f"{prefix}{key}", f"unknown key{hint}",
                        f"use one of {', '.join(prefix + k for k in spec)}")
    missing = [k for k in required if raw.get(k) in (None, "")]
    if missing:
        raise _fail(where, ", ".join(prefix + k for k in missing), "required but missing",
                    "add " + ", ".join(f"'{prefix}{k}: ...'" for k in missing))


_KIND_NAMES = {"str": "a string", "path": "a path", "int": "an integer", "number": "a number",
               "bool": "true or false", "str_list": "a list of strings", "mapping": "a mapping"}


def typed(value: Any, kind: str, *, where: str, key: str, base: Path | None = None) -> Any:
    """``value`` checked against ``kind`` (``int``, ``path?`` = path or null, ...)."""
    optional, kind = kind.endswith("?"), kind.rstrip("?")
    if value is None and optional:
        return None
    checks = {"str": lambda v: isinstance(v, str), "path": lambda v: isinstance(v, str) and v,
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool),
              "number": lambda v: _number(v) is not None,
              "str_list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "mapping": lambda v: isinstance(v, dict) or v is None}
    if not checks[kind](value):
        null = " or null" if optional else ""
        raise _fail(where, key, f"{value!r} is not {_KIND_NAMES[kind]}{null}",
                    f"give {key} {_KIND_NAMES[kind]}{null}")
    if kind == "path":
        path = Path(value).expanduser()
        return path if path.is_absolute() or base is None else (base / path).resolve()
    return _number(value) if kind == "number" else value


def _number(value: Any) -> float | None:
    """A finite number, or None. PyYAML (YAML 1.1) reads ``1e-5`` without a dot as a
    string, so a string that spells a finite float is a number too."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
