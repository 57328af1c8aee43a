"""Server-side sanity checks of client training updates, before any strategy sees them.

An update is rejected (and the reason logged and counted per client) when:

* it carries no arrays, or keys, shapes or dtypes that differ from the model's;
* any value is NaN or Inf;
* its example count (the FedAvg weight) differs from the client's partition size,
  which the server knows from start-up (a client claiming 10^12 examples would
  otherwise dominate the average with a small, norm-passing update);
* it changes what no honest client changes: frozen parameters and the statistics
  of frozen BatchNorm layers must come back exactly as sent;
* a BatchNorm running variance is negative;
* its norm ||w_i - w_global||_2 over the trained parameters is absurd: above
  ``fl.max_update_norm``, or above ``fl.norm_outlier_factor`` times the median of
  the round (with three or more updates).

The norm screens are off under client-level DP (``PrivacyMode.clips_updates``):
the server clips every update there, and rejecting by norm would make whether a
round releases depend on one client's data, outside the accountant.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import RecordDict

from fedimg.config import FederationConfig
from fedimg.errors import UpdateError
from fedimg.transport.records import check_arrays


def metrics_of(content: RecordDict) -> tuple[dict[str, float], int]:
    """The first MetricRecord of ``content`` without its weight, and the weight."""
    if not content.metric_records:
        return {}, 0
    record = next(iter(content.metric_records.values()))
    metrics = {k: float(v) for k, v in record.items() if k != "num-examples"}
    return metrics, int(record.get("num-examples", 0))


@dataclass
class UpdateChecks:
    """What a training update must satisfy, for one run's model."""

    reference: Mapping[str, torch.Tensor]
    fl: FederationConfig = field(default_factory=FederationConfig)
    fixed_keys: frozenset[str] = frozenset()  # not trained: excluded from the norm
    immutable_keys: frozenset[str] = frozenset()  # must come back exactly as sent
    screen_norms: bool = True
    expected_sizes: dict[int, int] = field(default_factory=dict)  # partition -> num train
    expected_val_sizes: dict[int, int] = field(default_factory=dict)  # partition -> num val
    max_reply_bytes: int | None = None  # a reply's arrays above this are refused undecoded

    def __post_init__(self) -> None:
        self.norm_keys = sorted(k for k, v in self.reference.items()
                                if k not in self.fixed_keys and v.is_floating_point())
        if self.max_reply_bytes is None:  # fl.max_reply_mb unset: 4x the model, plus 1 MB
            limit = self.fl.max_reply_mb
            model = sum(v.numel() * v.element_size() for v in self.reference.values())
            self.max_reply_bytes = int(limit * 1e6) if limit else 4 * model + 1_000_000

    def check(self, arrays: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray] | None,
              *, num_examples: int, partition_id: int) -> float:
        """Raise UpdateError for a malformed update; return ||w_i - w_global||_2 (or NaN).

        ``arrays`` is the client's update and ``start`` the global arrays it was sent
        (None if the message carried none), both already decoded.
        """
        expected = self.expected_sizes.get(partition_id)
        if num_examples <= 0 or (expected is not None and num_examples != expected):
            raise UpdateError(f"update claims {num_examples} training examples; this "
                              f"client's partition has {expected}")
        check_arrays(arrays, self.reference, exact_dtypes=True)
        for key, value in arrays.items():
            if key.endswith("running_var") and value.size and value.min() < 0:
                raise UpdateError(f"update '{key}' has a negative running variance")
        if start is None:
            return float("nan")
        for key in self.immutable_keys:
            if arrays[key] is start[key]:  # left out by the client, put back as sent
                continue
            if not np.array_equal(arrays[key], start[key].astype(arrays[key].dtype)):
                raise UpdateError(f"update changes '{key}', which is frozen; an honest "
                                  "client sends it back unchanged")
        return self._norm(arrays, start) if self.screen_norms else float("nan")

    def _norm(self, arrays: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> float:
        squares = sum(float(np.sum(np.square(arrays[k].astype(np.float64)
                                             - start[k].astype(np.float64))))
                      for k in self.norm_keys)
        norm = squares ** 0.5
        limit = self.fl.max_update_norm
        if limit is not None and norm > limit:
            raise UpdateError(f"update norm {norm:.4g} exceeds fl.max_update_norm={limit:g}")
        return norm

    def outliers(self, norms: Mapping[int, float]) -> dict[int, str]:
        """Node ids whose update norm is more than ``fl.norm_outlier_factor`` x the median."""
        factor = self.fl.norm_outlier_factor
        finite = [n for n in norms.values() if n == n]
        if not self.screen_norms or not factor or len(finite) < 3:
            return {}
        median = statistics.median(finite)
        return {nid: f"update norm {norm:.4g} is more than fl.norm_outlier_factor="
                     f"{factor:g} times the round's median {median:.4g}"
                for nid, norm in norms.items() if median > 0 and norm > factor * median}
