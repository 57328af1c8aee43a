"""The partitioner registry: how the pooled train split is divided among clients.

Each entry maps (labels, metadata) to one index array per client. Where a
flwr-datasets partitioner fits, it runs on an in-memory ``datasets.Dataset``
with an ``idx`` column, which is read back as the indices
(flwr-datasets is imported lazily: it takes ~4 s).

* ``iid``: a seeded shuffle cut into equal shards (IidPartitioner).
* ``dirichlet``: label skew. Each class is split over clients in proportions
  drawn from Dirichlet(alpha), with NIID-Bench's balancing (Li et al. 2022,
  "Federated learning on non-IID data silos: an experimental study", ICDE;
  DirichletPartitioner). With ``quantity_skew > 0`` client sizes are log-normal
  and each client's class mix is drawn from Dirichlet(alpha) (Hsu et al. 2019,
  "Measuring the effects of non-identical data distribution for federated visual
  classification"; InnerDirichletPartitioner).
* ``quantity``: log-normal client sizes, iid labels (SizePartitioner).
* ``shards``: pathological, ``classes_per_client`` classes each (McMahan et al.
  2017, "Communication-efficient learning of deep networks from decentralized
  data"; PathologicalPartitioner).
* ``natural``: whole groups of a metadata column (a site, a camera track). With
  more groups than clients, groups are packed greedily by size into exactly
  ``num_clients`` clients; flwr-datasets' GroupedNaturalIdPartitioner groups by
  a fixed group size, so it cannot promise that count.

Log-normal sizes give every client ``min_size`` samples first and split the rest
by log-normal weights, so the size floor holds by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from fedimg.config import DataConfig
from fedimg.errors import DataError
from fedimg.registry import Registry

PartitionFn = Callable[..., list[np.ndarray]]
PARTITIONERS: Registry[PartitionFn] = Registry("partitioner", config_key="data.partitioner")


def client_list(ids: Iterable[int], *, shown: int = 10) -> str:
    """``client 3`` / ``clients 3, 4, 5`` (the first ``shown`` ids, then a count)."""
    ids = list(ids)
    more = f" (+{len(ids) - shown} more)" if len(ids) > shown else ""
    label = "client" if len(ids) == 1 else "clients"
    return f"{label} {', '.join(str(i) for i in ids[:shown])}{more}"


def _run_flwr(partitioner: Any, columns: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a flwr-datasets partitioner on ``columns``; return each partition's ``idx``."""
    import datasets  # noqa: PLC0415 - heavy, only needed here

    n = len(next(iter(columns.values())))
    columns = {"idx": columns.pop("idx", np.arange(n)), **columns}
    partitioner.dataset = datasets.Dataset.from_dict(columns)
    count = partitioner.num_partitions
    return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
            for i in range(count)]


def lognormal_sizes(n: int, num_clients: int, *, sigma: float, min_size: int,
                    seed: int) -> list[int]:
    """Client sizes summing to ``n``: ``min_size`` each plus log-normal(0, sigma) shares."""
    spare = n - num_clients * min_size
    if spare < 0:
        raise DataError(f"{num_clients} clients x min {min_size} samples = "
                        f"{num_clients * min_size} > {n} training samples. Fix: fewer "
                        "clients or a smaller data.min_partition_size.")
    weights = np.random.default_rng([seed, 11]).lognormal(0.0, sigma, num_clients)
    exact = weights / weights.sum() * spare
    sizes = np.floor(exact).astype(int)
    sizes[np.argsort(-(exact - sizes), kind="stable")[: spare - sizes.sum()]] += 1
    return [int(s) + min_size for s in sizes]


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, metadata: dict[str, np.ndarray], *, cfg: DataConfig,
        num_clients: int, seed: int, min_size: int) -> list[np.ndarray]:
    """Equal shards of a seeded shuffle (sizes differ by at most one)."""
    from flwr_datasets.partitioner import IidPartitioner  # noqa: PLC0415

    order = np.random.default_rng([seed, 1]).permutation(len(labels))
    return _run_flwr(IidPartitioner(num_partitions=num_clients), {"idx": order})


@PARTITIONERS.register("dirichlet")
def dirichlet(labels: np.ndarray, metadata: dict[str, np.ndarray], *, cfg: DataConfig,
              num_clients: int, seed: int, min_size: int) -> list[np.ndarray]:
    """Dirichlet(alpha) label skew, with log-normal quantity skew if ``quantity_skew > 0``."""
    from flwr_datasets.partitioner import (  # noqa: PLC0415
        DirichletPartitioner,
        InnerDirichletPartitioner,
    )

    # InnerDirichletPartitioner assumes labels 0..K-1, so use dense ranks.
    dense = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    if cfg.quantity_skew > 0:
        sizes = lognormal_sizes(len(labels), num_clients, sigma=cfg.quantity_skew,
                                min_size=min_size, seed=seed)
        part = InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label",
                                         alpha=float(cfg.alpha), shuffle=True, seed=seed)
    else:
        part = DirichletPartitioner(num_partitions=num_clients, partition_by="label",
                                    alpha=float(cfg.alpha), min_partition_size=min_size,
                                    self_balancing=True, shuffle=True, seed=seed)
    return _run_flwr(part, {"label": dense})


@PARTITIONERS.register("quantity")
def quantity(labels: np.ndarray, metadata: dict[str, np.ndarray], *, cfg: DataConfig,
             num_clients: int, seed: int, min_size: int) -> list[np.ndarray]:
    """Log-normal(0, quantity_skew or 1.0) client sizes over a seeded shuffle."""
    from flwr_datasets.partitioner import SizePartitioner  # noqa: PLC0415

    sizes = lognormal_sizes(len(labels), num_clients, sigma=cfg.quantity_skew or 1.0,
                            min_size=min_size, seed=seed)
    order = np.random.default_rng([seed, 1]).permutation(len(labels))
    return _run_flwr(SizePartitioner(partition_sizes=sizes), {"idx": order})


@PARTITIONERS.register("shards")
def shards(labels: np.ndarray, metadata: dict[str, np.ndarray], *, cfg: DataConfig,
           num_clients: int, seed: int, min_size: int) -> list[np.ndarray]:
    """``classes_per_client`` classes per client; client i gets class i mod K first."""
    from flwr_datasets.partitioner import PathologicalPartitioner  # noqa: PLC0415

    part = PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                   num_classes_per_partition=cfg.classes_per_client,
                                   class_assignment_mode="first-deterministic",
                                   shuffle=True, seed=seed)
    return _run_flwr(part, {"label": labels.astype(np.int64)})


def _natural_ids(metadata: dict[str, np.ndarray], column: str) -> np.ndarray:
    if column not in metadata:
        raise DataError(f"data.natural_column='{column}' is not a metadata column of this "
                        f"dataset; available: {sorted(metadata) or 'none'}. Fix: choose one "
                        "of those, or another data.partitioner.")
    ids = np.asarray(metadata[column]).astype(str)
    if (ids == "").any():
        raise DataError(f"{int((ids == '').sum())} training samples have no '{column}' value."
                        " Fix: fill the column in metadata.csv or use another partitioner.")
    return ids


@PARTITIONERS.register("natural")
def natural(labels: np.ndarray, metadata: dict[str, np.ndarray], *, cfg: DataConfig,
            num_clients: int, seed: int, min_size: int) -> list[np.ndarray]:
    """Whole groups of ``natural_column`` per client, packed by size (largest first)."""
    ids = _natural_ids(metadata, cfg.natural_column)
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if len(unique) < num_clients and cfg.natural_split:
        inverse, counts = _split_groups(inverse, -(-num_clients // len(unique)))
        unique = counts  # only their number matters below
    if len(unique) < num_clients:
        empty = client_list(range(len(unique), num_clients))
        raise DataError(f"data.natural_column='{cfg.natural_column}' has {len(unique)} "
                        f"distinct values but clients={num_clients}; a value (one group) "
                        f"cannot be shared, so {empty} would get 0 of the {len(labels)} "
                        f"training samples. Fix: use at most {len(unique)} clients, another "
                        "data.partitioner (e.g. dirichlet or iid), or a data.natural_column "
                        "with more distinct values, or data.natural_split=true.")
    shuffled = np.random.default_rng([seed, 3]).permutation(len(unique))
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    group_of = np.empty(len(unique), dtype=np.int64)
    totals = np.zeros(num_clients, dtype=np.int64)
    for g in order:  # greedy longest-processing-time packing
        group_of[g] = int(np.argmin(totals))
        totals[group_of[g]] += counts[g]
    client = group_of[inverse]
    return [np.flatnonzero(client == c) for c in range(num_clients)]


def _split_groups(group: np.ndarray, pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every group into ``pieces`` contiguous runs (in dataset order): new ids, sizes.

    A GTSRB track is the frames of one sign as a car approaches it; split, each
    camera sees a stretch of it, so the natural skew (one sign per camera) stays.
    """
    new = np.empty_like(group)
    sizes: list[int] = []
    for g in range(int(group.max()) + 1):
        for chunk in np.array_split(np.flatnonzero(group == g), pieces):
            if chunk.size:
                new[chunk] = len(sizes)
                sizes.append(int(chunk.size))
    return new, np.asarray(sizes, dtype=np.int64)
