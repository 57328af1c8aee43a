"""A deployed site's own settings: its SuperNode's node config, not the run's.

The site daemon (:mod:`fedimg.deploy.site`) writes these keys into ``--node-config``;
the ClientApp reads them back with :func:`site_options`. A simulated node has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedimg.errors import DataError

# A deployed SuperNode's --node-config keys (see fedimg.deploy.site.node_config).
_SITE_FIELDS = {"site": "name", "data-path": "data_path", "device": "device",
                "num-threads": "num_threads", "min-samples": "min_samples",
                "max-samples": "max_samples"}


@dataclass(frozen=True)
class SiteOptions:
    """A deployed site's own settings (its SuperNode's node config), not the run's."""

    data_path: str
    name: str = ""
    device: str = ""  # "" = the run's train.device
    num_threads: int = 0
    min_samples: int = 16
    max_samples: int | None = None


def site_options(node_config: Mapping[str, Any]) -> SiteOptions | None:
    """A deployed site's options from its node config; None for a simulated node."""
    if "data-path" not in node_config:
        return None
    unknown = sorted(set(node_config) - set(_SITE_FIELDS) - {"partition-id", "num-partitions"})
    if unknown:
        raise DataError(f"unknown node-config keys {unknown}; valid: {sorted(_SITE_FIELDS)}")
    values = {field: node_config[key] for key, field in _SITE_FIELDS.items()
              if key in node_config}
    values.setdefault("name", str(node_config["data-path"]))
    return SiteOptions(**{k: (str(v) if k in ("name", "data_path", "device") else int(v))
                          for k, v in values.items()})
