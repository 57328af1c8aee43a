"""Datasets read from ``data.path``: your own image folder, CSV manifest or npz.

``data.dataset`` picks the reader (:data:`fedimg.config.schema.PATH_DATASETS`):

* ``folder``: ``DIR/<split>/<class>/<image>`` (split in train, val, test) or
  ``DIR/<class>/<image>``; an optional ``metadata.csv`` (a ``path`` column relative
  to ``DIR``, any other columns) and ``classes.csv``, as for the built-in folders
  (:mod:`fedimg.data.folders`).
* ``manifest``: a CSV with one row per image: ``path`` (relative to the CSV's folder,
  or absolute), ``label`` (a class name or number), an optional ``split`` (train,
  val, test) and any other columns (site, device, patient...), which become metadata
  a natural partition or a grouped split can use.
* ``npz``: MedMNIST-style arrays ``train_images``, ``train_labels`` and optionally
  ``val_*``, ``test_*`` and ``classes`` (the class names, in label order).
* ``hf:<name>`` (no ``data.path``): a Hugging Face dataset through flwr-datasets
  (:mod:`fedimg.data.hf_sets`).

Class names come from the data (folder names, the manifest's labels sorted, numbers
numerically, or the npz's ``classes``). Images go through the decode cache
(:mod:`fedimg.data.decode`): greyscale and colour, any size and the usual formats.
Without a test split, ``data.test_fraction`` of the images is carved off, stratified
by label, and by whole groups of ``data.group_column`` when set
(:mod:`fedimg.data.carve`). Bad input is one :class:`DataError` line with the fix.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from fedimg.config import DataConfig
from fedimg.data import medmnist
from fedimg.data.carve import carve_test, check_classes, group_values, leaked_groups
from fedimg.data.folders import SPLITS, Items, decode_splits, list_split
from fedimg.data.hf_sets import PREFIX as HF_PREFIX
from fedimg.data.hf_sets import read_hf
from fedimg.data.roots import resolve_data_root
from fedimg.data.types import ImageSet, RawSplits
from fedimg.errors import DataError

logger = logging.getLogger(__name__)

SHOWN = 5  # bad manifest rows named in an error (the rest are counted)
Sets = dict[str, ImageSet]


def _find(cfg: DataConfig) -> Path:
    """``data.path`` as given (relative to the working directory), else a relative path
    under the data root (``data.root`` or ``$FEDIMG_DATA``): ``data.path=ham_sites``."""
    given = Path(str(cfg.path)).expanduser()
    if not given.is_absolute() and not given.exists():
        under_root = resolve_data_root(cfg.root) / given
        if under_root.exists():
            return under_root.resolve()
    return given.resolve()


def load_path_dataset(cfg: DataConfig) -> RawSplits:
    """Read your own dataset: ``cfg.path`` with the reader ``cfg.dataset`` names, or a
    Hugging Face dataset ``hf:<name>`` (:mod:`fedimg.data.hf_sets`); see the module doc."""
    if cfg.dataset.startswith(HF_PREFIX):
        where = cfg.dataset
        classes, sets, warnings = read_hf(cfg.dataset, image_size=cfg.image_size)
    else:
        path = _find(cfg)
        if not path.exists():
            raise DataError(f"data.path={cfg.path} does not exist ({path}, nor under the "
                            f"data root {resolve_data_root(cfg.root)}). Fix: point data.path "
                            f"at your {cfg.dataset} ({_WHAT[cfg.dataset]}).")
        where = str(path)
        classes, sets, warnings = _READERS[cfg.dataset](path, cfg)
    sets, carved = _with_test_split(sets, cfg, where=where)
    check_classes(classes, sets["train"].labels.numpy(), sets["test"].labels.numpy(),
                  where=where, carved=carved)
    _warn_on_leaks(sets, cfg.group_column, warnings)
    return RawSplits(classes=classes, channels=int(sets["train"].images.shape[1]),
                     train=sets["train"], test=sets["test"], val=sets.get("val"),
                     location=where, warnings=tuple(warnings))


def _with_test_split(sets: Sets, cfg: DataConfig, *, where: str) -> tuple[Sets, bool]:
    """``sets`` unchanged if it has a test split; else train with a test split carved off."""
    if "test" in sets:
        return sets, False
    pool = sets["train"]
    groups = (group_values(pool.metadata, cfg.group_column, where=where)
              if cfg.group_column else None)
    mask = carve_test(pool.labels.numpy(), test_fraction=cfg.test_fraction, groups=groups)
    logger.info("%s has no test split: carved %d of %d images (data.test_fraction=%s%s)",
                where, int(mask.sum()), len(mask), cfg.test_fraction,
                f", whole groups of {cfg.group_column}" if cfg.group_column else "")
    return {**sets, "train": pool.subset(np.flatnonzero(~mask)),
            "test": pool.subset(np.flatnonzero(mask))}, True


def _warn_on_leaks(sets: Sets, column: str | None, warnings: list[str]) -> None:
    if not column or column not in sets["test"].metadata:
        return
    shared = leaked_groups(sets["train"].metadata[column], sets["test"].metadata[column])
    if shared:
        message = (f"{len(shared)} value(s) of {column} appear in both train and test "
                   f"(e.g. {shared[0]}): the given splits mix those groups")
        logger.warning(message)
        warnings.append(message)


# --- folder ------------------------------------------------------------------------

def _read_folder(path: Path, cfg: DataConfig) -> tuple[tuple[str, ...], Sets, list[str]]:
    if not path.is_dir():
        raise DataError(f"data.path={path} is not a folder, but data.dataset=folder reads "
                        "one. Fix: point it at DIR/<split>/<class>/<image> or "
                        "DIR/<class>/<image>, or use data.dataset=manifest for a CSV.")
    has_splits = any((path / s).is_dir() for s in SPLITS)
    splits = ({s: list_split(path / s) for s in SPLITS if (path / s).is_dir()} if has_splits
              else {"train": list_split(path)})
    if "train" not in splits:
        raise DataError(f"image folder {path} has {sorted(splits)} but no train/ folder. "
                        "Fix: add train/<class>/<image>, or drop the split folders.")
    for split, items in splits.items():
        if not items:
            where = path / split if has_splits else path
            raise DataError(f"no images under {where}/<class>/. Fix: arrange the images "
                            "as <class>/<image> (jpg, png, tif, bmp, ...).")
    return decode_splits(path, splits, image_size=cfg.image_size, on_corrupt=cfg.on_corrupt)


# --- manifest ----------------------------------------------------------------------

def _read_rows(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The manifest's rows and columns; ``path`` and ``label`` must be among them."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows, columns = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"manifest {path} cannot be read ({type(exc).__name__}: {exc}). "
                        "Fix: give a UTF-8 CSV with a header row.") from exc
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise DataError(f"manifest {path} has no {' or '.join(missing)} column (columns: "
                        f"{columns}). Fix: name the image column 'path' and the class "
                        "column 'label'.")
    if not rows:
        raise DataError(f"manifest {path} has a header but no rows. Fix: add one row per "
                        "image.")
    return rows, columns


def _bad_rows(path: Path, rows: list[dict[str, str]], files: list[Path]) -> None:
    """Refuse rows without a label, with an unknown split, or whose file is missing."""
    checks = (("has an empty label", lambda r, f: not (r["label"] or "").strip()),
              ("names a split other than train, val, test",
               lambda r, f: (r.get("split") or "train").strip() not in SPLITS),
              ("names a file that does not exist", lambda r, f: not f.is_file()))
    for what, bad in checks:
        found = [i + 2 for i, (r, f) in enumerate(zip(rows, files)) if bad(r, f)]
        if found:  # +2: the header is line 1
            first = rows[found[0] - 2]
            more = f" (+{len(found) - SHOWN} more)" if len(found) > SHOWN else ""
            raise DataError(f"manifest {path}: {len(found)} row(s) {what}: line(s) "
                            f"{', '.join(map(str, found[:SHOWN]))}{more}, e.g. "
                            f"path={first['path']!r} label={first['label']!r} "
                            f"split={first.get('split')!r}. Fix: correct or remove them.")


def _sorted_labels(values: set[str]) -> list[str]:
    """Class names in label order: numerically when every label is an integer."""
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _read_manifest(path: Path, cfg: DataConfig) -> tuple[tuple[str, ...], Sets, list[str]]:
    if not path.is_file():
        raise DataError(f"data.path={path} is not a file, but data.dataset=manifest reads a "
                        "CSV. Fix: point it at FILE.csv, or use data.dataset=folder.")
    rows, columns = _read_rows(path)
    files = [Path(os.path.normpath(path.parent / r["path"].strip())) for r in rows]
    _bad_rows(path, rows, files)
    classes = _sorted_labels({r["label"].strip() for r in rows})
    splits: dict[str, Items] = {}
    for row, file in zip(rows, files):
        split = (row.get("split") or "train").strip()
        splits.setdefault(split, []).append((file, row["label"].strip()))
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    extra = [c for c in columns if c not in ("path", "label", "split")]
    by_name = {f.relative_to(root).as_posix(): r for f, r in zip(files, rows)}

    def read_meta(_: Path, relpaths: list[str]) -> tuple[dict[str, np.ndarray], int]:
        return {c: np.array([(by_name[p].get(c) or "").strip() for p in relpaths], dtype=str)
                for c in extra}, 0

    ordered = {s: splits[s] for s in SPLITS if s in splits}
    return decode_splits(root, ordered, image_size=cfg.image_size, on_corrupt=cfg.on_corrupt,
                         read_meta=read_meta, classes=classes)


# --- npz ---------------------------------------------------------------------------

def _read_npz(path: Path, cfg: DataConfig) -> tuple[tuple[str, ...], Sets, list[str]]:
    optional = tuple(f"{s}_{k}" for s in ("val", "test") for k in ("images", "labels"))
    fix = ("Fix: save it with numpy.savez(FILE, train_images=..., train_labels=...[, "
           "test_images=..., test_labels=..., classes=...]).")
    arrays = medmnist.read_npz(path, required=("train_images", "train_labels"),
                               optional=(*optional, "classes"), fix=fix)
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays
              and f"{s}_labels" in arrays]
    labels = np.concatenate([medmnist.flat_labels(arrays, s, path=path) for s in splits])
    if labels.min() < 0:
        raise DataError(f"{path}: labels must be 0..K-1; found {labels.min()}. {fix}")
    names = ([str(c) for c in arrays["classes"].tolist()] if "classes" in arrays
             else [str(i) for i in range(int(labels.max()) + 1)])
    sets = {s: medmnist.image_set(arrays, s, image_size=cfg.image_size,
                                  num_classes=len(names), path=path) for s in splits}
    return tuple(names), sets, []


_READERS = {"folder": _read_folder, "manifest": _read_manifest, "npz": _read_npz}
_WHAT = {"folder": "a folder of split/class/image or class/image",
         "manifest": "a CSV with path,label[,split,...] columns",
         "npz": "a MedMNIST-style .npz"}
