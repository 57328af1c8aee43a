"""Hugging Face datasets as ``data.dataset=hf:<name>``, through flwr-datasets.

``<name>`` is a Hub id (``uoft-cs/cifar10``), a local dataset folder that
``datasets.load_dataset`` reads (parquet, arrow or image files), or a folder written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``. Hub ids and local folders go
through flwr-datasets' :class:`~flwr_datasets.FederatedDataset` (unshuffled: fedimg
partitions and seeds itself); ``save_to_disk`` folders through
``datasets.load_from_disk``, which flwr-datasets does not read.

Without a network, a Hub id is read from the local ``datasets`` cache
(``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set when the Hub does not answer); if it
is not there, one :class:`DataError` line names the cache path.

The image column is the first of type ``Image`` (else one named ``image``/``img``), the
label column the first ``ClassLabel`` (whose names become the class names; else one
named ``label``/``labels``, numbers or strings). Splits: ``train``, ``validation`` or
``val`` (as val) and ``test``; the rest of the scalar columns become metadata (a
``site`` column drives natural partitions and per-site metrics). Images go through
:func:`fedimg.data.decode.decode_images`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedimg.data.decode import decode_images
from fedimg.data.roots import host_reachable
from fedimg.data.types import ImageSet
from fedimg.errors import DataError

logger = logging.getLogger(__name__)

PREFIX = "hf:"
HUB = "https://huggingface.co"
SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels")


def hf_name(dataset: str) -> str:
    """``hf:<name>`` -> ``<name>``."""
    return dataset[len(PREFIX):]


def _saved_to_disk(name: str) -> bool:
    path = Path(name)
    return path.is_dir() and any((path / f).is_file() for f in
                                 ("dataset_dict.json", "state.json"))


def _cache_hint() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def load_splits(name: str) -> dict[str, Any]:
    """``{"train": datasets.Dataset, ...}`` of ``name`` (see the module doc), or a DataError."""
    import datasets

    if _saved_to_disk(name):
        loaded = datasets.load_from_disk(name)
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if not Path(name).exists() and host_reachable(HUB) is not None:
        _offline()
    return _federated_splits(name)


def _offline() -> None:
    """Read the local cache only, never wait on the Hub (env and the live settings)."""
    import datasets
    import huggingface_hub

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = True  # read at import time: set the live values too
    datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    logger.info("the Hugging Face Hub is not reachable: reading the datasets cache at %s",
                _cache_hint())


def _federated_splits(name: str) -> dict[str, Any]:
    from flwr_datasets import FederatedDataset

    fds = FederatedDataset(dataset=name, partitioners={"train": 1}, shuffle=False)
    out: dict[str, Any] = {}
    try:
        out["train"] = fds.load_split("train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds offline
        raise DataError(f"data.dataset=hf:{name} could not be loaded ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); without a "
                        f"network fedimg reads the datasets cache at {_cache_hint()}. Fix: "
                        "load it once where the Hub is reachable (datasets.load_dataset), "
                        "or save it with save_to_disk and give data.dataset=hf:<folder>") \
            from exc
    for split in ("validation", "val", "test"):
        try:
            out[split] = fds.load_split(split)
        except (ValueError, KeyError):
            continue
    return out


def _column(features: dict[str, Any], kind: str, names: tuple[str, ...]) -> str | None:
    """The first column of feature type ``kind`` (``Image``, ``ClassLabel``), else by name."""
    typed = [c for c, f in features.items() if type(f).__name__ == kind]
    named = [c for c in names if c in features]
    return (typed or named or [None])[0]


def columns(split: Any, *, where: str) -> tuple[str, str, list[str] | None]:
    """The image column, the label column and the ClassLabel names (or None)."""
    features = dict(split.features)
    image = _column(features, "Image", IMAGE_NAMES)
    label = _column(features, "ClassLabel", LABEL_NAMES)
    if image is None or label is None:
        raise DataError(f"{where} has no {'image' if image is None else 'label'} column "
                        f"(columns: {sorted(features)}). Fix: give it an Image column (or "
                        "'image') and a ClassLabel column (or 'label')")
    names = getattr(features[label], "names", None)
    return image, label, list(names) if names else None


def class_names(splits: dict[str, Any], label: str, names: list[str] | None) -> list[str]:
    """ClassLabel names, else the labels found (numbers in numeric order)."""
    if names:
        return names
    found = {str(v) for split in splits.values() for v in split[label]}
    numeric = all(v.lstrip("-").isdigit() for v in found)
    return sorted(found, key=int) if numeric else sorted(found)


def image_set(split: Any, *, image: str, label: str, classes: list[str],
              image_size: int, named: bool) -> ImageSet:
    """One split as an :class:`ImageSet`; scalar columns become metadata."""
    index = {name: i for i, name in enumerate(classes)}
    raw = split[label]
    labels = [int(v) if named else index[str(v)] for v in raw]
    meta = {c: np.asarray([str(v) for v in split[c]]) for c, f in split.features.items()
            if c not in (image, label) and type(f).__name__ == "Value"}
    images = decode_images(list(split[image]), image_size=image_size)
    return ImageSet(images=images, labels=torch.tensor(labels, dtype=torch.int64),
                    metadata=meta)


def read_hf(dataset: str, *, image_size: int) -> tuple[tuple[str, ...], dict[str, ImageSet],
                                                        list[str]]:
    """The class names and the splits of ``hf:<name>`` (train, maybe val and test)."""
    name = hf_name(dataset)
    splits = load_splits(name)
    image, label, names = columns(splits["train"], where=f"data.dataset={dataset}")
    classes = class_names(splits, label, names)
    sets = {SPLITS[s]: image_set(split, image=image, label=label, classes=classes,
                                 image_size=image_size, named=names is not None)
            for s, split in splits.items() if s in SPLITS}
    logger.info("hf:%s: %s", name, ", ".join(f"{s} {len(v)}" for s, v in sets.items()))
    return tuple(classes), sets, []
