"""The dataset registry and :func:`load_dataset`: find, (download,) decode, or fall back.

``DATASETS`` maps the ``data.dataset`` value to a :class:`DatasetSource` that
knows the class names, the channel count, the paths to check and how to load or
download it. ``data.source`` decides what happens when nothing is found:

* ``auto``: synthetic images that mimic the missing set (same classes and
  channels), announced by a multi-line warning banner and recorded as
  ``Provenance(source="synthetic-fallback")``;
* ``strict``: a :class:`DataError` listing the paths checked and the fix;
* ``synthetic``: always synthetic, even when the real data exists.

Your own data (``data.dataset=folder|manifest|npz`` with ``data.path``) is read by
:mod:`fedimg.data.path_sets` and never falls back: a missing path is an error.

A file that exists but is corrupt is never a fallback: a corrupt ``.npz`` is a
:class:`DataError`; corrupt image files follow ``data.on_corrupt`` (``refuse``: a
:class:`DataError` naming them all; ``skip``: dropped and named in
``Provenance.warnings``, hence in results.json). Loaders get the whole
:class:`DataConfig`, so such options reach them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fedimg.config import DataConfig
from fedimg.config.schema import PATH_DATASETS
from fedimg.data import medmnist, torchvision_sets
from fedimg.data.folders import MetadataHook, gtsrb_track_ids, load_image_folder
from fedimg.data.hf_sets import PREFIX as HF_PREFIX
from fedimg.data.path_sets import load_path_dataset
from fedimg.data.roots import resolve_data_root
from fedimg.data.synthetic import make_synthetic
from fedimg.data.types import Dataset, ImageSet, Provenance, RawSplits
from fedimg.errors import DataError
from fedimg.registry import Registry

logger = logging.getLogger(__name__)

Loader = Callable[[Path, Path, DataConfig], RawSplits]  # (found path, root, data config)
Downloader = Callable[[Path, DataConfig], RawSplits]  # (root, data config); OSError offline


@dataclass(frozen=True)
class DatasetSource:
    """How to find, load and download one dataset, and what it looks like."""

    name: str
    classes: tuple[str, ...]
    channels: int
    candidates: Callable[[Path], list[Path]]
    load: Loader | None = None  # None: generated, never read (``synthetic``)
    download: Downloader | None = None
    reads_path: bool = False  # read from data.path (your own data), never a fallback


DATASETS: Registry[DatasetSource] = Registry("dataset", config_key="data.dataset")


def _register_medmnist(name: str) -> None:
    info = medmnist.INFO[name]

    def load(path: Path, root: Path, cfg: DataConfig) -> RawSplits:
        return medmnist.load(path, name, image_size=cfg.image_size)

    def download(root: Path, cfg: DataConfig) -> RawSplits:
        return medmnist.load(medmnist.download(root, name), name, image_size=cfg.image_size)

    DATASETS.add(name, DatasetSource(name, info.classes, info.channels,
                                     lambda root: medmnist.candidates(root, name), load,
                                     download))


def _load_folder(path: Path, root: Path, cfg: DataConfig, *,
                 hook: MetadataHook | None = None) -> RawSplits:
    return load_image_folder(path, image_size=cfg.image_size, metadata_hook=hook,
                             on_corrupt=cfg.on_corrupt)


def _gtsrb_tv(root: Path, cfg: DataConfig, *, download: bool = False) -> RawSplits:
    return torchvision_sets.load_gtsrb(root, image_size=cfg.image_size, download=download,
                                       on_corrupt=cfg.on_corrupt)


def _cifar10_tv(root: Path, cfg: DataConfig, *, download: bool = False) -> RawSplits:
    return torchvision_sets.load_cifar10(root, image_size=cfg.image_size, download=download)


def _folder_or_tv(folder: str, tv_loader: Downloader,
                  hook: MetadataHook | None = None) -> Loader:
    """Load the image-folder copy ``folder`` if that was found, else torchvision's copy."""
    def load(path: Path, root: Path, cfg: DataConfig) -> RawSplits:
        if path.name == folder:
            return _load_folder(path, root, cfg, hook=hook)
        try:
            return tv_loader(root, cfg)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path} exists but torchvision cannot read it "
                            f"({type(exc).__name__}: {exc}). Fix: delete {path} so it is "
                            "downloaded again, or provide the image-folder copy "
                            f"{root / folder}.") from exc
    return load


for _name in medmnist.INFO:
    _register_medmnist(_name)
DATASETS.add("bccd_cells", DatasetSource(
    "bccd_cells", ("Platelets", "RBC", "WBC"), 3, lambda root: [root / "bccd_cells"],
    _load_folder))
DATASETS.add("gtsrb", DatasetSource(
    "gtsrb", torchvision_sets.GTSRB_CLASSES, 3,
    lambda root: [root / "gtsrb_subset", *torchvision_sets.gtsrb_candidates(root)],
    _folder_or_tv("gtsrb_subset", _gtsrb_tv, gtsrb_track_ids),
    partial(_gtsrb_tv, download=True)))
DATASETS.add("cifar10", DatasetSource(
    "cifar10", torchvision_sets.CIFAR10_CLASSES, 3,
    lambda root: [root / "cifar10_subset", *torchvision_sets.cifar10_candidates(root)],
    _folder_or_tv("cifar10_subset", _cifar10_tv), partial(_cifar10_tv, download=True)))
DATASETS.add("synthetic", DatasetSource("synthetic", (), 3, lambda root: []))
for _name in (*PATH_DATASETS, "hf"):  # classes and channels come from the data itself
    DATASETS.add(_name, DatasetSource(_name, (), 3, lambda root: [], reads_path=True))


def dataset_source(name: str) -> DatasetSource:
    """The registry entry of ``data.dataset`` (every ``hf:<name>`` is the ``hf`` entry)."""
    return DATASETS.get("hf" if name.startswith(HF_PREFIX) else name)


def federation_classes(cfg: DataConfig) -> tuple[str, ...]:
    """The class names a deployed federation labels with, without reading any data:
    ``data.classes`` if given (your own data), else the built-in dataset's."""
    return tuple(cfg.classes) if cfg.classes else dataset_source(cfg.dataset).classes


def stratified_subsample(split: ImageSet, max_samples: int | None, *, seed: int) -> ImageSet:
    """At most ``max_samples`` samples, each class keeping its share (largest remainder)."""
    n = len(split)
    if max_samples is None or max_samples >= n:
        return split
    labels = split.labels.numpy()
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * max_samples / n
    quota = np.floor(exact).astype(int)
    extra = np.argsort(-(exact - quota), kind="stable")[: max_samples - quota.sum()]
    quota[extra] += 1
    rng = np.random.default_rng([seed, 7])
    keep = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return split.subset(np.sort(np.concatenate(keep)))


def _synthetic(cfg: DataConfig, source: DatasetSource, seed: int) -> RawSplits:
    s = cfg.synthetic
    if not source.classes:  # synthetic, or your own data asked to be synthetic
        classes, channels = tuple(f"class_{i}" for i in range(s.num_classes)), s.channels
    else:
        classes, channels = source.classes, source.channels
    return make_synthetic(classes=classes, channels=channels, train_size=s.train_size,
                          test_size=s.test_size, gen_size=s.image_size,
                          image_size=cfg.image_size, seed=seed)


def _banner(name: str, checked: list[Path], download_note: str) -> str:
    lines = [f"DATASET '{name}' NOT FOUND: USING SYNTHETIC IMAGES INSTEAD",
             "Results of this run say NOTHING about the real data.", "Paths checked:",
             *[f"  {p}" for p in checked], f"Download: {download_note}",
             "Fix: put the data under data.root=/path (or set FEDIMG_DATA=/path),",
             "     or run online with data.download=true.",
             "     data.source=strict turns this fallback into an error."]
    bar = "#" * 78
    return "\n".join([bar, *[f"# {line}" for line in lines], bar])


def _find_or_download(source: DatasetSource, cfg: DataConfig, root: Path
                      ) -> tuple[RawSplits | None, list[Path], str]:
    checked = source.candidates(root)
    for path in checked:
        if path.exists() and source.load is not None:
            return source.load(path, root, cfg), checked, ""
    if not cfg.download:
        return None, checked, "disabled (data.download=false)"
    if source.download is None:
        return None, checked, f"not available for '{source.name}'"
    try:
        return source.download(root, cfg), checked, ""
    except (OSError, RuntimeError) as exc:
        return None, checked, f"failed ({type(exc).__name__}: {exc})"


def _resolve(cfg: DataConfig, source: DatasetSource, seed: int) -> tuple[RawSplits, Provenance]:
    if cfg.source == "synthetic" or (source.load is None and not source.reads_path):
        raw = _synthetic(cfg, source, seed)
        return raw, Provenance(source="synthetic", location=raw.location)
    if source.reads_path:
        raw = load_path_dataset(cfg)
        return raw, Provenance(source="real", location=raw.location, warnings=raw.warnings)
    root = resolve_data_root(cfg.root)
    raw, checked, note = _find_or_download(source, cfg, root)
    if raw is not None:
        return raw, Provenance(source="real", location=raw.location, warnings=raw.warnings)
    paths = ", ".join(str(p) for p in checked)
    if cfg.source == "strict":
        raise DataError(f"dataset '{source.name}' not found (data.source=strict); checked: "
                        f"{paths}; download {note}. Fix: set data.root or FEDIMG_DATA to the "
                        "folder holding it, or allow data.download=true on a machine online.")
    logger.warning("\n%s", _banner(source.name, checked, note))
    raw = _synthetic(cfg, source, seed)
    reason = f"'{source.name}' not found at {paths}; download {note}"
    return raw, Provenance(source="synthetic-fallback", location=raw.location,
                           fallback_reason=reason, warnings=(reason,))


def load_dataset(cfg: DataConfig, *, seed: int) -> Dataset:
    """Decode ``cfg.dataset`` into memory at ``cfg.image_size`` (see the module doc).

    ``max_train_samples`` / ``max_test_samples`` subsample train / test (seeded,
    class shares kept); the validation split, where one exists, is left whole.
    """
    source = dataset_source(cfg.dataset)
    start = time.perf_counter()
    raw, provenance = _resolve(cfg, source, seed)
    train = stratified_subsample(raw.train, cfg.max_train_samples, seed=seed)
    test = stratified_subsample(raw.test, cfg.max_test_samples, seed=seed + 1)
    logger.info("loaded %s (%s, %s): train %d, val %d, test %d, %d classes, %d ch, %d px "
                "in %.2f s", cfg.dataset, provenance.source, provenance.location, len(train),
                len(raw.val) if raw.val is not None else 0, len(test), len(raw.classes),
                raw.channels, cfg.image_size, time.perf_counter() - start)
    return Dataset(name=cfg.dataset, classes=raw.classes, channels=raw.channels, train=train,
                   test=test, val=raw.val, provenance=provenance)
