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
  labels itself (:func:`partition_counts`): no message, no start-up cost.
* In a deployment each site adds its class counts to its describe reply
  (:func:`site_counts` reads and checks one); the server sums them.

The counts go to every client with the run context (``CLASS_COUNTS_KEY``); each client
checks them against its own images before using them
(:meth:`fedimg.clientapp.environment.TaskEnvironment.install_class_counts`). Exact
counts leave each site, so ``fedimg.config.head_checks`` refuses this setting with a
privacy mode or SecAgg+.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import RecordDict

from fedimg.data import ClientPartition
from fedimg.errors import FedimgError
from fedimg.transport.records import counts_from_record


def partition_counts(labels: np.ndarray, partitions: Sequence[ClientPartition],
                     num_classes: int) -> np.ndarray:
    """(K,) int64 counts of the training labels of every partition together."""
    train = [np.asarray(p.train_indices, dtype=np.int64) for p in partitions]
    union = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    return np.bincount(np.asarray(labels)[union], minlength=num_classes).astype(np.int64)


def site_counts(content: RecordDict, *, num_classes: int, num_train: int) -> np.ndarray:
    """A site's reported counts, checked to add up to its reported training size."""
    counts = counts_from_record(content, num_classes=num_classes)
    if int(counts.sum()) != num_train:
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
