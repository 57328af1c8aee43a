"""Before round 1: the federation's class counts, for ``train.class_weighting=federated``.

With ``balanced`` weighting each client weighs its samples by the inverse of its *own*
class frequencies (King and Zeng 2001). Under label skew that changes what FedAvg
optimises: a site with 12 melanomas among 418 images weighs each of them 17 times a
nevus, so its few atypical melanomas steer the global model far more than pooled
training would let them. That is the objective inconsistency of Wang et al. 2020
("Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization"), here through the loss weights rather than the step counts.

``federated`` weighting gives every client the inverse class frequencies of the
*union*, ``w_c = n / (K n_c)``. A client's loss is ``(1/n_k) sum_i w_{y_i} l_i``
over its images, so FedAvg's ``sum_k (n_k / n) L_k`` is exactly pooled training's
balanced loss ``(1/n) sum_i w_{y_i} l_i``, however the labels are spread.

* In simulation the server partitioned the data, so it counts the union's training
  labels itself (``fedimg.data.label_distribution`` summed over clients): no message,
  no start-up cost.
* In a deployment each site adds its class counts to its describe reply
  (:func:`site_counts` reads and checks one); the server sums them.

The counts go to every client with the run context (``CLASS_COUNTS_KEY``); each client
checks them against its own images before using them
(:meth:`fedimg.clientapp.environment.TaskEnvironment.install_class_counts`). Exact
counts leave each site, so ``fedimg.config.head_checks`` refuses this setting with a
privacy mode or SecAgg+.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedimg.errors import FedimgError
from fedimg.transport.records import counts_from_record


def site_counts(content: RecordDict, *, num_classes: int, num_train: int) -> np.ndarray:
    """A site's reported counts, checked to add up to its reported training size."""
    counts = counts_from_record(content, num_classes=num_classes)
    if (counts > num_train).any() or int(counts.sum()) != num_train:  # no int64 wrap-around
        raise ValueError(f"class counts add up to {int(counts.sum())}, but the site "
                         f"reports {num_train} training images")
    return counts


def federation_counts(sites: Mapping[int, Mapping[str, Any]]) -> np.ndarray:
    """The sum of every deployed site's reported ``class_counts``; FedimgError if one has none."""
    missing = [str(s.get("name", cid)) for cid, s in sites.items() if "class_counts" not in s]
    if missing:
        raise FedimgError(f"train.class_weighting=federated, but sites {missing[:10]} sent no "
                          "class counts with their describe reply (a fedimg older than "
                          "this setting?). Fix: update those sites, or train.class_weighting="
                          "balanced")
    return np.sum([np.asarray(s["class_counts"], dtype=np.int64) for s in sites.values()],
                  axis=0)
