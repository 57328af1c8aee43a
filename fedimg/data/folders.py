"""Image-folder datasets: ``<dir>/<split>/<class>/<image>`` plus optional CSVs.

* ``metadata.csv``: a ``path`` column (relative to ``<dir>``) and any other
  columns, which become :attr:`ImageSet.metadata` aligned with the images (as
  strings; images without a row get ``""``). The class folder gives the label.
* ``classes.csv``: ``class_id,name`` mapping folder names to readable names.

The class list is the sorted union of class folders over all splits, so a class
missing from one split does not shift the labels of the others.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedimg.data.decode import Decoded, apply_corrupt_policy, decode_files
from fedimg.data.types import ImageSet, RawSplits
from fedimg.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif",
                              ".tif", ".tiff", ".webp"})
SPLITS = ("train", "val", "test")
MetadataHook = Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


Items = list[tuple[Path, str]]  # (image path, class folder name)


def class_folders(split_dir: Path) -> list[str]:
    """The class folders of one split, sorted; hidden ones (``.ipynb_checkpoints``) skipped."""
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def list_split(split_dir: Path) -> Items:
    """(image path, class folder name) for every image of one split, sorted (hidden skipped)."""
    items = []
    for name in class_folders(split_dir):
        files = sorted(e.name for e in os.scandir(split_dir / name)
                       if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
        items.extend((split_dir / name / f, name) for f in files)
    return items


def read_class_names(directory: Path, folders: list[str]) -> tuple[str, ...]:
    """Readable class names for ``folders`` from ``classes.csv`` (else the folder names)."""
    path = directory / "classes.csv"
    if not path.is_file():
        return tuple(folders)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"class_id", "name"} <= set(rows[0]):
        raise DataError(f"{path} must have columns class_id,name; found "
                        f"{list(rows[0]) if rows else 'no rows'}. Fix the file or delete it.")
    by_id = {_norm_id(r["class_id"]): r["name"] for r in rows}
    return tuple(by_id.get(_norm_id(f), f) for f in folders)


def _norm_id(value: str) -> str:
    value = value.strip()
    return str(int(value)) if value.isdigit() else value


def read_metadata(directory: Path, relpaths: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Columns of ``metadata.csv`` aligned with ``relpaths``; also the count of rows missing."""
    path = directory / "metadata.csv"
    if not path.is_file():
        return {}, 0
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c for c in (reader.fieldnames or []) if c != "path"]
        if "path" not in (reader.fieldnames or []):
            raise DataError(f"{path} has no 'path' column (columns: {reader.fieldnames}). "
                            "Fix: add a 'path' column relative to the dataset folder.")
        rows = {row["path"].replace("\\", "/"): row for row in reader}
    missing = sum(1 for rel in relpaths if rel not in rows)
    empty: dict[str, str] = {}
    meta = {c: np.array([rows.get(rel, empty).get(c, "") or "" for rel in relpaths], dtype=str)
            for c in columns}
    return meta, missing


def _split_sets(directory: Path) -> dict[str, Items]:
    splits = {s: list_split(directory / s) for s in SPLITS if (directory / s).is_dir()}
    if "train" not in splits or "test" not in splits:
        raise DataError(f"image folder {directory} needs train/ and test/ sub-folders "
                        f"(found: {sorted(splits) or 'none'}). Fix: arrange it as "
                        "<split>/<class>/<image> with split in train, val, test.")
    for split, items in splits.items():
        if not items:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
                            f"{directory / split}/<class>/. Fix: check the folder layout.")
    return splits


def _drop_corrupt(directory: Path, splits: dict[str, Items],
                  decoded: Decoded, on_corrupt: str
                  ) -> tuple[dict[str, Items], list[str]]:
    """Refuse corrupt files, or drop them from ``splits`` (returns the provenance warning)."""
    items = [item for split_items in splits.values() for item in split_items]
    rel = [p.relative_to(directory).as_posix() for p, _ in items]
    warning = apply_corrupt_policy(decoded.named(rel), total=len(rel), where=str(directory),
                                   on_corrupt=on_corrupt)
    if warning is None:
        return splits, []
    keep, kept, start = decoded.keep_mask(len(items)), {}, 0
    for split, split_items in splits.items():
        kept[split] = [it for it, ok in zip(split_items, keep[start:start + len(split_items)])
                       if ok]
        start += len(split_items)
        if not kept[split]:
            raise DataError(f"every image of {directory / split} is corrupt (data.on_corrupt="
                            "skip leaves none). Fix: replace the files (download the dataset "
                            "again).")
    return kept, [warning]


MetadataReader = Callable[[Path, list[str]], tuple[dict[str, np.ndarray], int]]


def decode_splits(directory: Path, splits: dict[str, Items], *, image_size: int,
                  metadata_hook: MetadataHook | None = None, on_corrupt: str = "refuse",
                  read_meta: MetadataReader = read_metadata, classes: list[str] | None = None
                  ) -> tuple[tuple[str, ...], dict[str, ImageSet], list[str]]:
    """Decode the images of ``splits`` (any split names) under ``directory``, cached.

    Returns the class names (``classes`` in label order, else the sorted union of
    class folders, renamed by ``classes.csv``), one :class:`ImageSet` per split with
    the columns ``read_meta`` gives for its paths (default: ``metadata.csv``), and
    the warnings (skipped corrupt files, images without a row).
    """
    folders = classes or sorted({name for items in splits.values() for _, name in items})
    index = {name: i for i, name in enumerate(folders)}
    all_paths = [p for items in splits.values() for p, _ in items]
    decoded = decode_files(all_paths, directory=directory, image_size=image_size)
    splits, warnings = _drop_corrupt(directory, splits, decoded, on_corrupt)
    sets: dict[str, ImageSet] = {}
    start = 0
    for split, items in splits.items():
        rel = [p.relative_to(directory).as_posix() for p, _ in items]
        meta, missing = read_meta(directory, rel)
        if missing and meta:
            warnings.append(f"{missing} {split} images have no row in {directory}/metadata.csv")
        if metadata_hook is not None:
            meta = metadata_hook(meta, rel)
        labels = torch.tensor([index[name] for _, name in items], dtype=torch.int64)
        sets[split] = ImageSet(images=decoded.images[start:start + len(items)], labels=labels,
                               metadata=meta)
        start += len(items)
    names = tuple(folders) if classes else read_class_names(directory, folders)
    return names, sets, warnings


def load_image_folder(directory: Path, *, image_size: int,
                      metadata_hook: MetadataHook | None = None,
                      on_corrupt: str = "refuse") -> RawSplits:
    """Decode an image-folder dataset (cached, see :mod:`fedimg.data.decode`).

    ``on_corrupt`` (``data.on_corrupt``) decides what happens to files that cannot
    be decoded: ``refuse`` raises a :class:`DataError` naming them all; ``skip``
    drops them (with their metadata rows) and names them in ``RawSplits.warnings``.
    """
    classes, sets, warnings = decode_splits(directory, _split_sets(directory),
                                            image_size=image_size, metadata_hook=metadata_hook,
                                            on_corrupt=on_corrupt)
    return RawSplits(classes=classes, channels=int(sets["train"].images.shape[1]),
                     train=sets["train"], test=sets["test"], val=sets.get("val"),
                     location=str(directory), warnings=tuple(warnings))


def gtsrb_track_ids(meta: dict[str, np.ndarray], relpaths: list[str]) -> dict[str, np.ndarray]:
    """Make GTSRB's ``track`` a global sign id ``<class>_<track>``.

    GTSRB numbers tracks per class (``00000``, ``00001`` in every class folder),
    so the raw column would merge different physical signs. The raw value is kept
    as ``track_in_class``; rows without a track (the test split) stay ``""``.
    """
    if "track" not in meta:
        return meta
    raw = meta["track"]
    classes = [rel.split("/")[1] for rel in relpaths]
    track = np.array([f"{c}_{t}" if t else "" for c, t in zip(classes, raw)], dtype=str)
    return {**meta, "track": track, "track_in_class": raw}
