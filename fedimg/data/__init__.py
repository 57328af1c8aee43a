"""Image data for fedimg: sources, partitioning across clients, transforms, loading.

Plain PyTorch/numpy; never imports flwr, ray or opacus (flwr-datasets, used for
partitioning, is imported lazily). The flow::

    ds = load_dataset(cfg.data, seed=cfg.seed)              # decoded once, resized
    parts = partition_dataset(ds.train, cfg=cfg.data, num_clients=cfg.clients,
                              seed=cfg.seed)                # indices per client
    loader = InMemoryLoader(ds.train.images, ds.train.labels,
                            indices=parts[i].train_indices, batch_size=32,
                            transform=build_transform(cfg.data.augment,
                                                      image_size=cfg.data.image_size,
                                                      train=True),
                            shuffle=True, seed=cfg.seed)

Modules: :mod:`~fedimg.data.sources` (registry, :func:`load_dataset`, fallback),
:mod:`~fedimg.data.medmnist`, :mod:`~fedimg.data.folders`,
:mod:`~fedimg.data.torchvision_sets`, :mod:`~fedimg.data.synthetic`,
:mod:`~fedimg.data.decode` (decode cache), :mod:`~fedimg.data.partitioners`,
:mod:`~fedimg.data.partition`, :mod:`~fedimg.data.transforms`,
:mod:`~fedimg.data.loader`.
"""

from fedimg.data.loader import InMemoryLoader
from fedimg.data.partition import (
    ClientPartition,
    label_distribution,
    load_partitions,
    partition_dataset,
    save_partitions,
)
from fedimg.data.partitioners import PARTITIONERS
from fedimg.data.roots import resolve_data_root
from fedimg.data.site import (
    SiteData,
    own_site_rows,
    read_site_data,
    site_dataset,
    site_fingerprint,
)
from fedimg.data.sources import DATASETS, federation_classes, load_dataset
from fedimg.data.transforms import AUGMENTATIONS, build_transform
from fedimg.data.types import Dataset, ImageSet, Provenance

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "PARTITIONERS",
    "ClientPartition",
    "Dataset",
    "ImageSet",
    "InMemoryLoader",
    "Provenance",
    "SiteData",
    "build_transform",
    "federation_classes",
    "label_distribution",
    "load_dataset",
    "load_partitions",
    "partition_dataset",
    "read_site_data",
    "site_dataset",
    "own_site_rows",
    "resolve_data_root",
    "save_partitions",
    "site_fingerprint",
]
