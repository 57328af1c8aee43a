"""train.class_weighting=federated: the federation's class counts, summed and checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedimg.data import ClientPartition
from fedimg.errors import FedimgError
from fedimg.data import label_distribution
from fedimg.serverapp.class_counts import federation_counts, site_counts
from fedimg.training.losses import balanced_weights_from_counts
from fedimg.transport.records import CLASS_COUNTS_KEY, counts_from_record, counts_record


def test_the_union_of_the_partitions_is_counted_once_per_training_image() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 1])
    parts = [ClientPartition(0, np.array([0, 1, 2]), np.array([7])),
             ClientPartition(1, np.array([3, 4, 5]), np.array([6]))]
    # Training labels 0,0,1 and 1,1,2; validation rows 6 and 7 do not count.
    # (the server's federated counts in simulation: fedimg.serverapp.run._discover)
    assert label_distribution(labels, parts, 4).sum(axis=0).tolist() == [2, 3, 1, 0]


def test_federated_weights_make_fedavgs_objective_the_pooled_balanced_loss() -> None:
    # Arrange: two sites with opposite skew, one per-sample loss each image
    labels = [torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1])]
    losses = [torch.tensor([0.1, 0.2, 0.3, 1.0]), torch.tensor([0.5, 0.7])]
    counts = torch.bincount(torch.cat(labels), minlength=2)  # [3, 3]
    pooled_w = balanced_weights_from_counts(counts)  # n / (K n_c) = 6 / 6 = 1 each
    # Act: FedAvg's sum_k n_k/n * (1/n_k) sum_i w_{y_i} l_i, with the union's weights
    n = sum(len(y) for y in labels)
    fedavg = sum(len(y) / n * (pooled_w[y] * l).sum() / len(y) for y, l in zip(labels, losses))
    local = sum(len(y) / n * (balanced_weights_from_counts(torch.bincount(y, minlength=2))[y]
                              * l).sum() / len(y) for y, l in zip(labels, losses))
    # Assert: pooled balanced loss (0.1+0.2+0.3+1.0+0.5+0.7)/6 = 0.4667; each site's own
    # weights give (4/6)(0.6*2/3 + 1.0*2)/4 + (2/6)(1.2/2) = 0.4 + 0.2 = 0.6 instead
    assert float(fedavg) == pytest.approx(2.8 / 6)
    assert float(local) == pytest.approx(0.6)


def test_a_sites_counts_must_add_up_to_its_training_size() -> None:
    content = RecordDict({CLASS_COUNTS_KEY: counts_record(np.array([3, 4]))})
    assert site_counts(content, num_classes=2, num_train=7).tolist() == [3, 4]
    with pytest.raises(ValueError, match="add up to 7, but the site reports 8"):
        site_counts(content, num_classes=2, num_train=8)
    # Counts that wrap around int64 to the right sum are still refused
    wrapped = np.array([2**62, 2**62, 2**62, 2**62 + 7], dtype=np.int64)
    assert int(wrapped.sum()) == 7
    with pytest.raises(ValueError, match="add up to"):
        site_counts(RecordDict({CLASS_COUNTS_KEY: counts_record(wrapped)}), num_classes=4,
                    num_train=7)


@pytest.mark.parametrize(("array", "says"), [
    (np.array([1.5, 2.0]), "dtype float64"),
    (np.array([1, 2, 3]), r"shape \(3,\)"),
    (np.array([-1, 5]), "negative or all zero"),
    (np.array([0, 0]), "negative or all zero"),
])
def test_malformed_counts_are_named(array, says) -> None:
    content = RecordDict({CLASS_COUNTS_KEY: ArrayRecord({"counts": Array(array)})})
    with pytest.raises(ValueError, match=says):
        counts_from_record(content, num_classes=2)


def test_the_sites_counts_are_summed_and_a_site_without_them_is_named() -> None:
    sites = {0: {"name": "a", "class_counts": [3, 0]}, 1: {"name": "b", "class_counts": [1, 4]}}
    assert federation_counts(sites).tolist() == [4, 4]
    with pytest.raises(FedimgError, match=r"sites \['c'\] sent no class counts"):
        federation_counts({**sites, 2: {"name": "c"}})
