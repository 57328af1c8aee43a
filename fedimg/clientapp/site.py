"""A deployed site's own settings: its SuperNode's node config, not the run's.

The site daemon (:mod:`fedimg.deploy.site`) writes these keys into ``--node-config``;
the ClientApp reads them back with :func:`site_options`. A simulated node has none.
This is the one place where the kebab-case node-config keys become snake_case
fields (``policy-max-run-epsilon`` -> ``SitePolicy.max_run_epsilon``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fedimg.clientapp.policy import NEVER_ACCEPT, SitePolicy
from fedimg.errors import DataError

# A deployed SuperNode's --node-config keys (see fedimg.deploy.site.node_config).
_SITE_FIELDS = {"site": "name", "data-path": "data_path", "device": "device",
                "num-threads": "num_threads", "min-samples": "min_samples",
                "max-samples": "max_samples", "state-dir": "state_dir",
                "federation": "federation"}
_TEXT = ("name", "data_path", "device", "state_dir", "federation")
POLICY_PREFIX = "policy-"


@dataclass(frozen=True)
class SiteOptions:
    """A deployed site's own settings (its SuperNode's node config), not the run's."""

    data_path: str
    name: str = ""
    device: str = ""  # "" = the run's train.device
    num_threads: int = 0
    min_samples: int = 16
    max_samples: int | None = None
    state_dir: str = ""  # where the site keeps its privacy ledger; "" = none kept on disk
    federation: str = ""  # the ledger's key: which federation this site spends budget in
    policy: SitePolicy = field(default_factory=SitePolicy)


def policy_node_config(policy: SitePolicy) -> dict[str, Any]:
    """``policy`` as node-config entries (``policy-<field>``; a list as comma-joined text)."""
    out: dict[str, Any] = {}
    for f in fields(SitePolicy):
        value = getattr(policy, f.name)
        if value is not None:
            key = POLICY_PREFIX + f.name.replace("_", "-")
            out[key] = ",".join(value) if isinstance(value, tuple) else value
    return out


def _policy(node_config: Mapping[str, Any]) -> SitePolicy:
    kinds = {f.name: f.type for f in fields(SitePolicy)}
    values: dict[str, Any] = {}
    for key, value in node_config.items():
        if not key.startswith(POLICY_PREFIX):
            continue
        name = key[len(POLICY_PREFIX):].replace("-", "_")
        if name not in kinds:
            raise DataError(f"unknown node-config key {key}; valid: "
                            f"{sorted(policy_node_config(SitePolicy(lifetime_epsilon=1)))}")
        if name == "never_accept":
            value = tuple(v for v in str(value).split(",") if v)
            unknown = sorted(set(value) - set(NEVER_ACCEPT))
            if unknown:
                raise DataError(f"node config {key}: unknown settings {unknown}; valid: "
                                f"{list(NEVER_ACCEPT)}")
        elif name == "require_dp":
            value = bool(value)
        elif name == "min_batch_size":
            value = int(value)
        else:
            value = float(value)
        values[name] = value
    return SitePolicy(**values)


def site_options(node_config: Mapping[str, Any]) -> SiteOptions | None:
    """A deployed site's options from its node config; None for a simulated node."""
    if "data-path" not in node_config:
        return None
    unknown = sorted(k for k in set(node_config) - set(_SITE_FIELDS)
                     - {"partition-id", "num-partitions"} if not k.startswith(POLICY_PREFIX))
    if unknown:
        raise DataError(f"unknown node-config keys {unknown}; valid: {sorted(_SITE_FIELDS)}")
    values: dict[str, Any] = {field: node_config[key] for key, field in _SITE_FIELDS.items()
                              if key in node_config}
    values.setdefault("name", str(node_config["data-path"]))
    values = {k: (str(v) if k in _TEXT else int(v)) for k, v in values.items()}
    return SiteOptions(**values, policy=_policy(node_config))
