"""One site's own image archive: read it, check it against the federation's classes, split it.

A site (a hospital, a camera) keeps ONE local dataset next to its client daemon.
:func:`read_site_data` reads it before the daemon joins and again when a run
starts; every problem is a :class:`DataError` whose message starts with the data
path and ends with the fix. Layouts of ``data_path``:

* ``<class>/<image>``: one sub-folder per class (hidden files are skipped);
* ``train/<class>/<image>`` plus optional ``val/<class>/<image>`` (``test/`` is ignored);
* optional ``metadata.csv`` (``path`` column relative to ``data_path``, kept as
  :attr:`ImageSet.metadata`) and ``classes.csv`` (``class_id,name``, folder -> name);
* a MedMNIST-style ``.npz`` (``train_images``/``train_labels``, optional ``val_*``)
  whose labels are indices into the federation's class list.

A class folder is named after a federation class, or its index (``12`` or ``00012``).
Without a ``val`` split, :func:`~fedimg.data.partition.val_count` images (``round(
val_fraction * n)``, at least 1) are held out, spread over classes in proportion
to their size (largest remainder, seeded ties); ``max_samples`` caps the training
part by the same rule. Files are decoded once through :func:`decode_files` (cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fedimg.data.decode import ON_CORRUPT, apply_corrupt_policy, decode_files, resize_batch, to_nchw
from fedimg.data.folders import IMAGE_EXTENSIONS, read_class_names, read_metadata
from fedimg.data.partition import ClientPartition, val_count
from fedimg.data.types import Dataset, ImageSet, Provenance
from fedimg.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SHOWN_CLASSES = 30  # class names listed in an error (the rest are counted)
_LAYOUTS = ("<class>/<image>, train/<class>/<image> [+ val/<class>/<image>], or a .npz "
            "with train_images/train_labels")


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class SiteData:
    """A site's local data: train/val :class:`ImageSet` labelled by the federation's classes."""

    train: ImageSet
    val: ImageSet
    classes: tuple[str, ...]
    location: str
    warnings: tuple[str, ...] = ()

    @property
    def label_counts(self) -> list[int]:
        """Training images per federation class (``len == len(classes)``)."""
        return np.bincount(self.train.labels.numpy(), minlength=len(self.classes)).tolist()


class _Pool(NamedTuple):
    """Every readable image of a site, the split each came from, and findings so far."""

    images: ImageSet
    split_of: np.ndarray  # "train" | "val" per image
    has_val: bool  # the site has a val split (then it is the validation part, even if empty)
    warnings: list[str]


@contextmanager
def _about(location: str) -> Iterator[None]:
    """Make every DataError raised inside start with ``location``; an OSError is one too."""
    try:
        yield
    except DataError as exc:
        if str(exc).startswith(location):
            raise
        raise DataError(f"{location}: {exc}") from exc
    except OSError as exc:  # e.g. a folder without read permission
        raise DataError(f"{location}: cannot be read ({type(exc).__name__}: {exc}). Fix: "
                        "check the path and the daemon user's permissions.") from exc


def _check_args(classes: Sequence[str], *, image_size: int, min_samples: int,
                val_fraction: float, on_corrupt: str, max_samples: int | None) -> None:
    problems = []
    if not classes or len(set(classes)) != len(classes):
        problems.append(f"classes={list(classes)} must be non-empty and without duplicates")
    if image_size < 1 or min_samples < 1:
        problems.append(f"image_size={image_size} and min_samples={min_samples} must be >= 1")
    if not 0 <= val_fraction < 1:
        problems.append(f"val_fraction={val_fraction} must be in [0, 1)")
    if on_corrupt not in ON_CORRUPT:
        problems.append(f"on_corrupt='{on_corrupt}' is unknown; valid: {', '.join(ON_CORRUPT)}")
    if max_samples is not None and max_samples < min_samples:
        problems.append(f"max_samples={max_samples} is below min_samples={min_samples}")
    if problems:
        raise ConfigError("read_site_data: " + "; ".join(problems) + ". Fix these arguments.")


def _visible(directory: Path) -> list[os.DirEntry[str]]:
    """Entries of ``directory`` without hidden ones (.DS_Store, ._x.png, .ipynb_checkpoints)."""
    return sorted((e for e in os.scandir(directory) if not e.name.startswith(".")),
                  key=lambda e: e.name)


def _is_image(entry: os.DirEntry[str]) -> bool:
    return entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS


def _split_dirs(root: Path, classes: Sequence[str]) -> dict[str, Path]:
    """``{"train": dir[, "val": dir]}``: the split folders, or ``root`` itself."""
    if not (root / "train").is_dir() or "train" in classes:
        return {"train": root}
    if (root / "test").is_dir():
        logger.info("%s: ignoring test/ (a site reads only train/ and val/)", root)
    return {s: root / s for s in ("train", "val") if (root / s).is_dir()}


def _list_images(split_dir: Path, warnings: list[str]) -> dict[str, list[Path]]:
    """Class folder -> its image files (sorted); loose images beside the folders are noted."""
    entries = _visible(split_dir)
    loose = sum(_is_image(e) for e in entries)
    if loose:
        warnings.append(f"ignored {loose} image file(s) directly under {split_dir} "
                        "(not in a class folder)")
    return {e.name: [split_dir / e.name / f.name for f in _visible(Path(e.path)) if _is_image(f)]
            for e in entries if e.is_dir()}


def _shown(names: Sequence[str]) -> str:
    more = f" (+{len(names) - SHOWN_CLASSES} more)" if len(names) > SHOWN_CLASSES else ""
    return ", ".join(names[:SHOWN_CLASSES]) + more


def _match_folders(root: Path, folders: list[str], classes: Sequence[str]) -> dict[str, int]:
    """Class folder -> index into ``classes``: by name (after classes.csv), then by number."""
    index = {name: i for i, name in enumerate(classes)}
    matched: dict[str, int] = {}
    for folder, name in zip(folders, read_class_names(root, folders)):
        if name in index or folder in index:
            matched[folder] = index.get(name, index.get(folder))
        elif folder.isdigit() and int(folder) < len(classes):
            matched[folder] = int(folder)
    unknown = [f for f in folders if f not in matched]
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(unknown)} match none of the "
                        f"federation's {len(classes)} classes ({_shown(list(classes))}). Fix: "
                        "rename each to a class name or its index (e.g. 00012 for class 12), "
                        "map it in classes.csv (class_id,name), or move it out of the folder.")
    return matched


def _read_folder(root: Path, *, classes: Sequence[str], image_size: int,
                 on_corrupt: str) -> _Pool:
    """The readable images of a folder site (corrupt files refused or dropped)."""
    warnings: list[str] = []
    listed = {s: _list_images(d, warnings) for s, d in _split_dirs(root, classes).items()}
    folders = sorted({f for by_class in listed.values() for f in by_class})
    if not folders:
        raise DataError(f"{root}: no class sub-folders (found: "
                        f"{_shown([e.name for e in _visible(root)]) or 'nothing'}). Fix: "
                        f"arrange the images as {_LAYOUTS}.")
    index = _match_folders(root, folders, classes)
    items = [(p, index[f], s) for s, by_class in listed.items()
             for f, paths in by_class.items() for p in paths]
    if not items:
        raise DataError(f"{root}: the class folders ({_shown(folders)}) hold no image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))}). Fix: add the images.")
    rel = [p.relative_to(root).as_posix() for p, _, _ in items]
    decoded = decode_files([p for p, _, _ in items], directory=root, image_size=image_size)
    warning = apply_corrupt_policy(decoded.named(rel), total=len(rel), where=str(root),
                                   on_corrupt=on_corrupt)
    keep = decoded.keep_mask(len(items))
    kept = [(it, r) for it, r, ok in zip(items, rel, keep) if ok]
    if len(kept) != decoded.images.shape[0]:  # never hand out labels misaligned to pixels
        raise DataError(f"{root}: internal error: {len(kept)} readable files but "
                        f"{decoded.images.shape[0]} decoded images. Fix: clear the decode cache.")
    meta, missing = read_metadata(root, [r for _, r in kept])
    if missing and meta:
        warnings.append(f"{missing} images have no row in {root}/metadata.csv")
    labels = torch.tensor([label for (_, label, _), _ in kept], dtype=torch.int64)
    return _Pool(ImageSet(images=decoded.images, labels=labels, metadata=meta),
                 np.array([s for (_, _, s), _ in kept]), "val" in listed,
                 warnings + ([warning] if warning else []))


def _npz_labels(path: Path, arrays: dict[str, np.ndarray], split: str,
                classes: Sequence[str]) -> torch.Tensor:
    n, raw, k = len(arrays[f"{split}_images"]), arrays[f"{split}_labels"], len(classes)
    if raw.shape not in ((n,), (n, 1)) or not np.issubdtype(raw.dtype, np.integer):
        raise DataError(f"{path}: {split}_labels is {raw.dtype} {raw.shape} for {n} images; "
                        f"expected integers of shape ({n},) or ({n}, 1). Fix: save one class "
                        "index per image.")
    flat = raw.reshape(n).astype(np.int64)
    bad, counts = np.unique(flat[(flat < 0) | (flat >= k)], return_counts=True)
    if bad.size:
        listed = ", ".join(f"{v} ({c} images)" for v, c in zip(bad.tolist(), counts.tolist()))
        raise DataError(f"{path}: {int(counts.sum())} of {n} {split}_labels lie outside "
                        f"[0, {k}): {listed}. Fix: labels must index the federation's {k} "
                        f"classes ({_shown(list(classes))}) in that order.")
    return torch.from_numpy(flat)


def _npz_images(path: Path, array: np.ndarray, split: str, image_size: int) -> torch.Tensor:
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or (
            array.ndim == 4 and array.shape[-1] not in (1, 3)):
        raise DataError(f"{path}: {split}_images is {array.dtype} {array.shape}; expected uint8 "
                        "(N, H, W) or (N, H, W, C) with C 1 or 3. Fix: save 0-255 uint8 "
                        "greyscale or RGB images.")
    return resize_batch(to_nchw(array), image_size)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The train_*/val_* arrays of an npz; a DataError if it is empty, truncated or corrupt."""
    fix = "Fix: copy the file again (or re-export it) and check it opens with numpy.load."
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the npz is empty (0 bytes), e.g. an interrupted copy. {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files if k.startswith(("train_", "val_"))}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"{path}: the npz is truncated or corrupt ({type(exc).__name__}: "
                        f"{exc}). {fix}") from exc


def _read_npz(path: Path, *, classes: Sequence[str], image_size: int) -> _Pool:
    """The images of a MedMNIST-style npz site."""
    arrays = _load_npz(path)
    splits = [s for s in ("train", "val") if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    missing = [f"{s}_{k}" for s in ["train", *splits[1:]] for k in ("images", "labels")
               if f"{s}_{k}" not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing} (found {sorted(arrays)}). Fix: "
                        "save train_images and train_labels (optionally val_images with "
                        "val_labels).")
    images = [_npz_images(path, arrays[f"{s}_images"], s, image_size) for s in splits]
    if len({im.shape[1] for im in images}) > 1:  # grey and RGB splits: grey is repeated
        images = [im.expand(-1, 3, -1, -1) for im in images]
    labels = torch.cat([_npz_labels(path, arrays, s, classes) for s in splits])
    return _Pool(ImageSet(images=torch.cat(images).contiguous(), labels=labels),
                 np.repeat(splits, [len(im) for im in images]), "val" in splits, [])


def _stratified(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` sorted indices spread over classes by size (largest remainder, seeded ties)."""
    if count == 0:
        return np.empty(0, dtype=np.int64)
    classes, sizes = np.unique(labels, return_counts=True)
    take, remainder = np.divmod(sizes * count, len(labels))
    order = np.lexsort((rng.random(len(classes)), -remainder))
    take[order[: count - int(take.sum())]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _split(pool: _Pool, *, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): the val split as given, else a stratified seeded hold-out."""
    if pool.has_val:
        return (pool.images.subset(np.flatnonzero(pool.split_of == "train")),
                pool.images.subset(np.flatnonzero(pool.split_of == "val")))
    labels = pool.images.labels.numpy()
    val = _stratified(labels, val_count(len(labels), val_fraction),
                      np.random.default_rng([seed, 1]))
    return pool.images.subset(np.setdiff1d(np.arange(len(labels)), val)), pool.images.subset(val)


def _check_counts(location: str, train: ImageSet, val: ImageSet, *, min_samples: int,
                  val_fraction: float, has_val_split: bool) -> None:
    if len(train) >= min_samples and len(val) >= 1:
        return
    fixes = []
    if len(train) < min_samples:
        fixes += ["add images to the site's data", f"lower min_samples (now {min_samples})"]
    if len(val) < 1:
        fixes.append("add readable images to val/ (or remove val/ to hold out val_fraction)"
                     if has_val_split else f"raise val_fraction (now {val_fraction}) above 0")
    raise DataError(f"{location}: {len(train)} training and {len(val)} validation images "
                    f"(after dropping unreadable files); a site needs at least min_samples="
                    f"{min_samples} training images and 1 validation image. Fix: "
                    + ", or ".join(fixes) + ".")


def read_site_data(data_path: str | Path, *, classes: Sequence[str], image_size: int,
                   min_samples: int = 16, val_fraction: float = 0.1, seed: int = 0,
                   on_corrupt: str = "refuse", max_samples: int | None = None) -> SiteData:
    """Read, check and split one site's local images (see the module docstring).

    Labels are indices into ``classes``; corrupt files follow ``on_corrupt``
    (``refuse`` | ``skip``); ``max_samples`` caps the training part (stratified,
    seeded). Raises :class:`DataError` (message starting with the path) on bad data.
    """
    _check_args(classes, image_size=image_size, min_samples=min_samples,
                val_fraction=val_fraction, on_corrupt=on_corrupt, max_samples=max_samples)
    root = Path(data_path).expanduser().resolve()
    location = str(root)
    with _about(location):
        if not root.exists():
            raise DataError(f"{location}: no such file or folder. Fix: point the site's data "
                            f"path at its images ({_LAYOUTS}).")
        if root.is_file() and root.suffix.lower() != ".npz":
            raise DataError(f"{location}: a file, but not an .npz. Fix: use {_LAYOUTS}.")
        pool = (_read_npz(root, classes=classes, image_size=image_size) if root.is_file()
                else _read_folder(root, classes=classes, image_size=image_size,
                                  on_corrupt=on_corrupt))
        train, val = _split(pool, val_fraction=val_fraction, seed=seed)
        _check_counts(location, train, val, min_samples=min_samples,
                      val_fraction=val_fraction, has_val_split=pool.has_val)
    if max_samples is not None and len(train) > max_samples:
        logger.info("%s: keeping %d of %d training images (max_samples)", location,
                    max_samples, len(train))
        train = train.subset(_stratified(train.labels.numpy(), max_samples,
                                         np.random.default_rng([seed, 2])))
    site = SiteData(train=train, val=val, classes=tuple(classes), location=location,
                    warnings=tuple(pool.warnings))
    absent = [c for c, n in zip(classes, site.label_counts) if n == 0]
    if absent:
        logger.info("%s: no training images of %d of %d classes: %s", location, len(absent),
                    len(classes), _shown(absent))
    return site


def _data_files(root: Path) -> Iterator[Path]:
    """Every non-hidden file under ``root`` (or ``root`` itself), in a stable order."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))


def site_fingerprint(data_path: str | Path) -> str:
    """Short hex digest of the (relative path, size, mtime_ns) of the site's data files.

    Cheap (no decoding): for logs and as a cache key. An edited, added or removed
    file changes it; a missing path is a :class:`DataError`.
    """
    root = Path(data_path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{root}: no such file or folder. Fix: point the site's data path "
                        "at its images.")
    listing = []
    for path in _data_files(root):
        stat = path.stat()
        rel = path.name if path == root else path.relative_to(root).as_posix()
        listing.append((rel, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def site_dataset(site: SiteData, *, name: str) -> tuple[Dataset, list[ClientPartition]]:
    """A site's images as a one-client dataset: train then val rows, one partition
    (what a deployed site's task environment trains and validates on)."""
    n_train, n_val = len(site.train.labels), len(site.val.labels)
    pooled = ImageSet(images=torch.cat([site.train.images, site.val.images]),
                      labels=torch.cat([site.train.labels, site.val.labels]))
    dataset = Dataset(name=name, classes=site.classes,
                      channels=int(pooled.images.shape[1]), train=pooled, test=site.val,
                      val=None, provenance=Provenance(source="real", location=site.location,
                                                      warnings=site.warnings))
    part = ClientPartition(0, np.arange(n_train), np.arange(n_train, n_train + n_val))
    return dataset, [part]


def own_site_rows(dataset: Dataset, rows: np.ndarray, *, column: str | None
                  ) -> np.ndarray | None:
    """The test rows of the one site training ``rows`` come from, or None.

    In a natural split by ``data.site_column`` (every training row of a client from
    one site) these are the site's held-out images, on which a site judges a
    personalised model; a deployed site's rows carry no site column.
    """
    train, test = dataset.train, dataset.test
    if not column or column not in train.metadata or column not in test.metadata:
        return None
    sites = set(np.asarray(train.metadata[column])[rows].astype(str))
    if len(sites) != 1:
        return None
    own = np.flatnonzero(np.asarray(test.metadata[column]).astype(str) == sites.pop())
    return own if own.size else None
