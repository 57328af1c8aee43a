"""Split the pooled train split into clients, each with a local train/val split.

:func:`partition_dataset` runs the partitioner named by ``data.partitioner``
(see :mod:`fedimg.data.partitioners`), then splits every client's indices into
train and validation with a seeded shuffle (validation gets
``round(val_fraction * n)`` samples, at least one when ``val_fraction > 0``).
It checks, before round 1, that the result is feasible: enough samples for every
client to get one training sample, no client left with 0 training samples, and at
least ``data.min_partition_size`` training samples per client; each error names
the clients, the sample count and what to change.
The same seed always gives the same indices.
"""

from __future__ import annotations

import logging
import math
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedimg.config import DataConfig
from fedimg.data.partitioners import PARTITIONERS, client_list
from fedimg.data.types import ImageSet
from fedimg.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ClientPartition:
    """One client's share: indices into ``dataset.train`` for local training and validation."""

    client_id: int
    train_indices: np.ndarray
    val_indices: np.ndarray

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ClientPartition) and self.client_id == other.client_id
                and np.array_equal(self.train_indices, other.train_indices)
                and np.array_equal(self.val_indices, other.val_indices))

    @property
    def num_examples(self) -> int:
        """Training examples (the FedAvg weight of this client)."""
        return int(len(self.train_indices))


def val_count(n: int, val_fraction: float) -> int:
    """Validation samples out of ``n``: round(fraction * n), at least 1 if fraction > 0."""
    if val_fraction <= 0 or n == 0:
        return 0
    return max(1, int(math.floor(n * val_fraction + 0.5)))


def min_total(min_train: int, val_fraction: float) -> int:
    """Smallest client size whose train part still has ``min_train`` samples."""
    total = min_train
    while total - val_count(total, val_fraction) < min_train:
        total += 1
    return total


def _describe(cfg: DataConfig) -> str:
    detail = {"dirichlet": f"alpha={cfg.alpha}, quantity_skew={cfg.quantity_skew}",
              "quantity": f"quantity_skew={cfg.quantity_skew or 1.0}",
              "shards": f"classes_per_client={cfg.classes_per_client}",
              "natural": f"natural_column='{cfg.natural_column}'"}.get(cfg.partitioner, "")
    return f"partitioner={cfg.partitioner}" + (f" ({detail})" if detail else "")


def _advice(cfg: DataConfig, *, empty: bool = False) -> str:
    """What to change; ``empty``: some client has no training sample at all."""
    first = {"dirichlet": f"a larger data.alpha (now {cfg.alpha}; e.g. 1.0 is milder skew)",
             "quantity": "a smaller data.quantity_skew",
             "shards": "a different data.classes_per_client",
             "natural": "fewer clients than natural groups"}.get(cfg.partitioner, "")
    last = ("another data.partitioner, or more training data" if empty
            else "a smaller data.min_partition_size")
    options = [o for o in (first, "fewer clients", last) if o]
    return "Fix: use " + ", or ".join(options) + "."


def _split_val(client_id: int, indices: np.ndarray, *, val_fraction: float,
               seed: int) -> ClientPartition:
    rng = np.random.default_rng([seed, 5, client_id])
    shuffled = rng.permutation(np.asarray(indices, dtype=np.int64))
    n_val = val_count(len(shuffled), val_fraction)
    return ClientPartition(client_id=client_id, train_indices=np.sort(shuffled[n_val:]),
                           val_indices=np.sort(shuffled[:n_val]))


def _check_enough_samples(n: int, num_clients: int, cfg: DataConfig) -> None:
    """Refuse, before partitioning, more clients than can get one training sample each."""
    per = min_total(1, cfg.val_fraction)  # one for training, the rest to validation
    if num_clients * per <= n:
        return
    able = n // per
    share = (f", as each needs {per} samples to keep one for training with "
             f"data.val_fraction={cfg.val_fraction}") if per > 1 else ""
    raise DataError(f"clients={num_clients} is too many for the {n} training samples: at "
                    f"most {able} clients can get a training sample{share}, so at least "
                    f"{num_clients - able} client(s) would get 0 training samples. Fix: use "
                    f"at most {able} clients, or more training data (a larger "
                    "data.max_train_samples or dataset), or a smaller data.val_fraction.")


def _check_empty(parts: list[ClientPartition], cfg: DataConfig, n: int) -> None:
    """Refuse a partition that leaves some client with 0 training samples."""
    empty = [p.client_id for p in parts if p.num_examples == 0]
    if empty:
        raise DataError(f"{client_list(empty)} got 0 training samples under {_describe(cfg)}"
                        f" with {len(parts)} clients and {n} training samples "
                        f"({len(empty)} of {len(parts)} clients empty); a client without data "
                        f"cannot train. {_advice(cfg, empty=True)}")


def _check_sizes(parts: list[ClientPartition], cfg: DataConfig, n: int) -> None:
    small = [(p.client_id, p.num_examples) for p in parts
             if p.num_examples < cfg.min_partition_size]
    if small:
        (first, count), listed = small[0], ", ".join(f"{c}: {k}" for c, k in small[:10])
        raise DataError(f"client {first} got {count} training samples (< data.min_partition_"
                        f"size={cfg.min_partition_size}) under {_describe(cfg)} with "
                        f"{len(parts)} clients and {n} samples; {len(small)} client(s) are "
                        f"below it (client: size {listed}). {_advice(cfg)}")


def _check_disjoint(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if len(np.unique(joined)) != len(joined) or (joined.size and joined.max() >= n):
        raise DataError("internal error: client partitions overlap or index past the data")
    if len(joined) < n:
        logger.warning("%d of %d training samples are assigned to no client (e.g. shards "
                       "with fewer clients x classes_per_client than classes)", n - len(joined), n)


def partition_dataset(train: ImageSet, *, cfg: DataConfig, num_clients: int,
                      seed: int) -> list[ClientPartition]:
    """Disjoint client partitions of ``train`` (indices), deterministic given ``seed``."""
    n = len(train)
    if num_clients < 1:
        raise ConfigError(f"clients={num_clients} is impossible: need at least 1 client")
    _check_enough_samples(n, num_clients, cfg)
    partitioner = PARTITIONERS.get(cfg.partitioner)
    need = min_total(cfg.min_partition_size, cfg.val_fraction)
    try:
        with warnings.catch_warnings():  # flwr-datasets warns on every Dirichlet retry
            warnings.simplefilter("ignore")
            raw = partitioner(train.labels.numpy(), train.metadata, cfg=cfg,
                              num_clients=num_clients, seed=seed, min_size=need)
    except (ValueError, IndexError) as exc:
        floor = need - val_count(need, cfg.val_fraction)
        raise DataError(f"{_describe(cfg)} could not split {n} samples into {num_clients} "
                        f"clients of at least {need} samples ({floor} train): "
                        f"{str(exc).rstrip('.')}. {_advice(cfg)}") from exc
    _check_disjoint(raw, n)
    parts = [_split_val(i, idx, val_fraction=cfg.val_fraction, seed=seed)
             for i, idx in enumerate(raw)]
    _check_empty(parts, cfg, n)
    _check_sizes(parts, cfg, n)
    sizes = [p.num_examples for p in parts]
    logger.info("%s: %d clients, train sizes min %d / median %d / max %d", _describe(cfg),
                len(parts), min(sizes), int(np.median(sizes)), max(sizes))
    return parts


def label_distribution(labels: np.ndarray | torch.Tensor, partitions: Sequence[ClientPartition],
                       num_classes: int) -> np.ndarray:
    """Counts of each class in each client's training indices: (clients, classes) int64."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p.train_indices], minlength=num_classes)
                     for p in partitions]).astype(np.int64)


def save_partitions(path: str | Path, partitions: Sequence[ClientPartition]) -> None:
    """Write partitions to an ``.npz`` (concatenated indices plus offsets)."""
    def pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.cumsum([0, *[len(a) for a in arrays]]).astype(np.int64)
        flat = np.concatenate(arrays).astype(np.int64) if arrays else np.empty(0, np.int64)
        return flat, offsets

    train, train_off = pack([p.train_indices for p in partitions])
    val, val_off = pack([p.val_indices for p in partitions])
    with open(path, "wb") as handle:
        np.savez(handle, client_ids=np.array([p.client_id for p in partitions], np.int64),
                 train=train, train_offsets=train_off, val=val, val_offsets=val_off)


def load_partitions(path: str | Path) -> list[ClientPartition]:
    """Read partitions written by :func:`save_partitions`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            ids, tr, tro, va, vao = (npz[k] for k in ("client_ids", "train", "train_offsets",
                                                     "val", "val_offsets"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read partitions from {path} ({type(exc).__name__}: {exc}). "
                        "Fix: delete it so the partitions are rebuilt.") from exc
    return [ClientPartition(client_id=int(c), train_indices=tr[tro[i]:tro[i + 1]],
                            val_indices=va[vao[i]:vao[i + 1]]) for i, c in enumerate(ids)]
