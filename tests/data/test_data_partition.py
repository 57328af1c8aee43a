"""Partitioning: hand-computed sizes, determinism, disjointness, skew and error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.config import DataConfig
from fedimg.data import (
    PARTITIONERS,
    ClientPartition,
    ImageSet,
    label_distribution,
    load_partitions,
    partition_dataset,
    save_partitions,
)
from fedimg.data.partition import min_total, val_count
from fedimg.data.partitioners import lognormal_sizes
from fedimg.errors import ConfigError, DataError


def make_set(n: int, num_classes: int, metadata: dict[str, np.ndarray] | None = None
             ) -> ImageSet:
    """n tiny images whose labels cycle through 0..num_classes-1."""
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return ImageSet(images=torch.zeros(n, 1, 8, 8, dtype=torch.uint8), labels=labels,
                    metadata=metadata or {})


def all_indices(parts: list[ClientPartition]) -> np.ndarray:
    return np.concatenate([np.concatenate([p.train_indices, p.val_indices]) for p in parts])


def mean_tv_from_uniform(parts: list[ClientPartition], labels: np.ndarray, k: int) -> float:
    """Mean total-variation distance of client label mixes from the uniform global mix."""
    counts = label_distribution(labels, parts, k).astype(float)
    mix = counts / counts.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(mix - 1 / k).sum(axis=1).mean())


def test_iid_100_samples_4_clients_gives_25_each_split_20_train_5_val() -> None:
    # Arrange
    train = make_set(100, 4)
    cfg = DataConfig(partitioner="iid", val_fraction=0.2, min_partition_size=1)
    # Act
    parts = partition_dataset(train, cfg=cfg, num_clients=4, seed=0)
    # Assert
    assert [len(p.train_indices) + len(p.val_indices) for p in parts] == [25, 25, 25, 25]
    assert [len(p.train_indices) for p in parts] == [20, 20, 20, 20]
    assert [len(p.val_indices) for p in parts] == [5, 5, 5, 5]
    assert [p.client_id for p in parts] == [0, 1, 2, 3]


def test_iid_10_samples_3_clients_sizes_differ_by_at_most_one() -> None:
    parts = partition_dataset(make_set(10, 2), cfg=DataConfig(
        partitioner="iid", val_fraction=0.0, min_partition_size=1), num_clients=3, seed=0)
    assert sorted(p.num_examples for p in parts) == [3, 3, 4]


def test_val_count_and_min_total_by_hand() -> None:
    assert [val_count(n, 0.1) for n in (0, 1, 10, 15, 25)] == [0, 1, 1, 2, 3]
    assert val_count(25, 0.2) == 5 and val_count(25, 0.0) == 0
    # 18 samples -> round(1.8) = 2 val, 16 train; 17 -> 2 val, 15 train
    assert min_total(16, 0.1) == 18
    assert min_total(16, 0.0) == 16


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity", "shards"])
def test_partitions_are_disjoint_covering_and_seeded(name: str) -> None:
    # Arrange
    train = make_set(600, 6)
    cfg = DataConfig(partitioner=name, alpha=0.5, classes_per_client=2, min_partition_size=5)
    # Act
    first = partition_dataset(train, cfg=cfg, num_clients=6, seed=1)
    again = partition_dataset(train, cfg=cfg, num_clients=6, seed=1)
    other = partition_dataset(train, cfg=cfg, num_clients=6, seed=2)
    # Assert
    joined = all_indices(first)
    assert len(joined) == 600 and np.array_equal(np.sort(joined), np.arange(600))
    assert first == again
    assert first != other


def test_shards_give_each_client_at_most_classes_per_client_labels() -> None:
    train = make_set(1000, 10)
    cfg = DataConfig(partitioner="shards", classes_per_client=2, min_partition_size=5)
    parts = partition_dataset(train, cfg=cfg, num_clients=10, seed=0)
    distinct = (label_distribution(train.labels.numpy(), parts, 10) > 0).sum(axis=1)
    assert distinct.max() <= 2
    assert len(all_indices(parts)) == 1000  # 10 clients >= 10 classes: every class used


def test_small_alpha_is_more_skewed_than_large_alpha() -> None:
    # Arrange: 1000 samples, 10 balanced classes, 5 clients
    train = make_set(1000, 10)
    labels = train.labels.numpy()

    def skew(alpha: float) -> float:
        cfg = DataConfig(partitioner="dirichlet", alpha=alpha, min_partition_size=10)
        return mean_tv_from_uniform(partition_dataset(train, cfg=cfg, num_clients=5, seed=0),
                                    labels, 10)
    # Act
    skewed, mild = skew(0.1), skew(100.0)
    # Assert: measured 0.64 vs 0.04 (0 = every client holds the global mix)
    assert skewed > 0.4
    assert mild < 0.1


def test_quantity_skew_sizes_sum_to_n_and_respect_the_floor() -> None:
    sizes = lognormal_sizes(1000, 8, sigma=1.0, min_size=20, seed=0)
    assert sum(sizes) == 1000 and min(sizes) >= 20
    assert max(sizes) > 2 * min(sizes)
    cfg = DataConfig(partitioner="dirichlet", alpha=0.5, quantity_skew=1.0, min_partition_size=10)
    parts = partition_dataset(make_set(1000, 5), cfg=cfg, num_clients=8, seed=0)
    assert len(all_indices(parts)) == 1000


def test_natural_keeps_each_site_on_one_client_and_packs_by_size() -> None:
    # Arrange: 6 sites of sizes 60, 50, 40, 30, 20, 10 -> 3 clients
    sites = np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), [60, 50, 40, 30, 20, 10])
    train = make_set(210, 3, {"site": sites})
    cfg = DataConfig(partitioner="natural", natural_column="site", val_fraction=0.0,
                     min_partition_size=1)
    # Act
    parts = partition_dataset(train, cfg=cfg, num_clients=3, seed=0)
    # Assert: largest first to the emptiest client -> {a,f}=70, {b,e}=70, {c,d}=70
    site_sets = [set(sites[p.train_indices]) for p in parts]
    assert sum(len(s) for s in site_sets) == 6
    assert sorted(p.num_examples for p in parts) == [70, 70, 70]


def test_natural_errors_name_the_problem() -> None:
    train = make_set(40, 2, {"site": np.repeat(np.array(["x", "y"]), 20)})
    with pytest.raises(DataError, match="has 2 distinct values but clients=3"):
        partition_dataset(train, cfg=DataConfig(partitioner="natural", natural_column="site",
                                                min_partition_size=1), num_clients=3, seed=0)
    with pytest.raises(DataError, match=r"'track' is not a metadata column.*\['site'\]"):
        partition_dataset(train, cfg=DataConfig(partitioner="natural", natural_column="track",
                                                min_partition_size=1), num_clients=2, seed=0)


def test_min_partition_size_error_names_client_count_partitioner_and_fix() -> None:
    # 100 samples / 10 clients = 10 each, 1 to validation -> 9 < 20
    cfg = DataConfig(partitioner="iid", min_partition_size=20)
    with pytest.raises(DataError) as info:
        partition_dataset(make_set(100, 2), cfg=cfg, num_clients=10, seed=0)
    message = str(info.value)
    assert "client 0 got 9 training samples" in message
    assert "min_partition_size=20" in message and "partitioner=iid" in message
    assert "fewer clients" in message


def test_dirichlet_retry_failure_becomes_data_error_with_alpha_advice() -> None:
    cfg = DataConfig(partitioner="dirichlet", alpha=0.01, min_partition_size=150)
    with pytest.raises(DataError, match=r"alpha=0.01.*larger data.alpha"):
        partition_dataset(make_set(1000, 10), cfg=cfg, num_clients=5, seed=0)


def test_iid_with_more_clients_than_samples_names_counts_and_fix() -> None:
    # Arrange: 10 samples; with val_fraction=0.1 a client needs 2 (1 val + 1 train) -> 5 max
    train = make_set(10, 2)
    # Act
    with pytest.raises(DataError) as info:
        partition_dataset(train, cfg=DataConfig(partitioner="iid"), num_clients=11, seed=0)
    # Assert
    message = str(info.value)
    assert "clients=11 is too many for the 10 training samples" in message
    assert "at most 5 clients can get a training sample" in message
    assert "at least 6 client(s) would get 0 training samples" in message
    assert "Fix: use at most 5 clients" in message


def test_iid_without_validation_allows_one_client_per_sample_but_no_more() -> None:
    cfg = DataConfig(partitioner="iid", val_fraction=0.0, min_partition_size=1)
    parts = partition_dataset(make_set(10, 2), cfg=cfg, num_clients=10, seed=0)
    assert [p.num_examples for p in parts] == [1] * 10
    with pytest.raises(DataError, match=r"at most 10 clients.*at least 1 client\(s\) would "
                                        r"get 0 training samples"):
        partition_dataset(make_set(10, 2), cfg=cfg, num_clients=11, seed=0)


def test_the_largest_feasible_client_count_gives_one_training_sample_each() -> None:
    # 10 samples, 5 clients: 2 each, round(0.1 * 2) -> at least 1 to validation, 1 to train
    cfg = DataConfig(partitioner="iid", min_partition_size=1)
    parts = partition_dataset(make_set(10, 2), cfg=cfg, num_clients=5, seed=0)
    assert [(p.num_examples, len(p.val_indices)) for p in parts] == [(1, 1)] * 5


def test_natural_with_more_clients_than_groups_names_the_empty_clients() -> None:
    # Arrange: 2 sites of 20 samples, 5 clients -> sites go to clients 0 and 1
    train = make_set(40, 2, {"site": np.repeat(np.array(["x", "y"]), 20)})
    cfg = DataConfig(partitioner="natural", natural_column="site", min_partition_size=1)
    # Act
    with pytest.raises(DataError) as info:
        partition_dataset(train, cfg=cfg, num_clients=5, seed=0)
    # Assert
    message = str(info.value)
    assert "has 2 distinct values but clients=5" in message
    assert "clients 2, 3, 4 would get 0 of the 40 training samples" in message
    assert "use at most 2 clients" in message and "another data.partitioner" in message


def test_a_client_left_without_training_samples_is_named() -> None:
    # Arrange: sites of 30 and 1 samples; the 1-sample client gives it to validation
    sites = np.repeat(np.array(["big", "tiny"]), [30, 1])
    train = make_set(31, 2, {"site": sites})
    cfg = DataConfig(partitioner="natural", natural_column="site", min_partition_size=0)
    # Act
    with pytest.raises(DataError) as info:
        partition_dataset(train, cfg=cfg, num_clients=2, seed=0)
    # Assert: largest group first -> "big" to client 0, "tiny" to client 1
    message = str(info.value)
    assert "client 1 got 0 training samples under partitioner=natural" in message
    assert "with 2 clients and 31 training samples (1 of 2 clients empty)" in message
    assert "fewer clients" in message


def test_unknown_partitioner_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="dirichlet, iid, natural, quantity, shards"):
        partition_dataset(make_set(10, 2), cfg=DataConfig(partitioner="zipf"), num_clients=2,
                          seed=0)
    assert PARTITIONERS.names() == ["dirichlet", "iid", "natural", "quantity", "shards"]


def test_label_distribution_by_hand() -> None:
    labels = np.array([0, 0, 1, 2])
    parts = [ClientPartition(0, np.array([0, 1]), np.array([], dtype=np.int64)),
             ClientPartition(1, np.array([2, 3]), np.array([], dtype=np.int64))]
    assert label_distribution(labels, parts, 3).tolist() == [[2, 0, 0], [0, 1, 1]]


def test_save_then_load_partitions_round_trips(tmp_path) -> None:
    parts = partition_dataset(make_set(50, 2), cfg=DataConfig(partitioner="iid",
                              min_partition_size=1), num_clients=3, seed=0)
    path = tmp_path / "partitions.npz"
    save_partitions(path, parts)
    assert load_partitions(path) == parts
    path.write_bytes(b"not an npz")
    with pytest.raises(DataError, match="partitions.npz"):
        load_partitions(path)


def test_natural_split_cuts_groups_into_contiguous_runs_for_a_bigger_fleet() -> None:
    # Arrange: 2 tracks of 30 frames, 5 cameras -> each track cut into ceil(5/2) = 3 runs
    # of 10 frames; 6 runs packed into 5 cameras: one gets 20 frames, four get 10.
    tracks = np.repeat(np.array(["t0", "t1"]), 30)
    train = make_set(60, 2, {"track": tracks})
    cfg = DataConfig(partitioner="natural", natural_column="track", natural_split=True,
                     val_fraction=0.0, min_partition_size=1)
    # Act
    parts = partition_dataset(train, cfg=cfg, num_clients=5, seed=0)
    # Assert
    assert sorted(p.num_examples for p in parts) == [10, 10, 10, 10, 20]
    for p in parts:  # whole runs of 10 consecutive frames, each from one track
        idx = np.sort(p.train_indices)
        runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
        assert sum(len(r) for r in runs) == len(idx) and all(len(r) % 10 == 0 for r in runs)
        assert all(len(set(tracks[r])) == 1 for r in np.split(idx, len(idx) // 10))
    assert len(all_indices(parts)) == 60
