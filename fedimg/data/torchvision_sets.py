"""CIFAR-10 and GTSRB through :mod:`torchvision.datasets`, under ``<root>/torchvision``.

Used when the image-folder copies (``cifar10_subset``, ``gtsrb_subset``) are
absent: an existing torchvision download is loaded, and with ``data.download``
a new one is attempted after probing the host (so offline fails in < 1 s).
GTSRB's ``.ppm`` files are decoded through the decode cache; its ``track``
metadata (one physical sign) comes from the file names ``<track>_<frame>.ppm``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedimg.data.decode import (
    Decoded,
    apply_corrupt_policy,
    decode_files,
    resize_batch,
    to_nchw,
)
from fedimg.data.roots import host_reachable
from fedimg.data.types import ImageSet, RawSplits

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
GTSRB_CLASSES = (
    "Speed limit to 20", "Speed limit to 30", "Speed limit to 50", "Speed limit to 60",
    "Speed limit to 70", "Speed limit to 80", "End of speed limit up to 80",
    "Speed limit to 100", "Speed limit to 120", "No overtaking", "No overtaking for trucks",
    "Priority to through-traffic at the next intersection/crossroads only", "Priority Road",
    "Yield to cross traffic", "Stop and give way", "No vehicles of any kind permitted",
    "No trucks permitted", "Do not enter", "Danger point", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curves", "Uneven surfaces ahead", "Slippery road",
    "Road narrows on the right", "Roadworks", "Traffic signals - Primary Priority",
    "Pedestrian crossing", "Children crossing", "Bicycle lane", "Snow or Ice possible ahead",
    "Wild animals possible", "End of previous limitation", "You must turn right ahead",
    "You must turn left ahead", "You must go straight ahead",
    "You must go straight or turn right", "You must go straight or turn left",
    "Keep right of traffic barrier/divider", "Keep left of traffic barrier/divider",
    "Roundabout", "End of the ban on overtaking", "End of the ban on overtaking for trucks",
)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"


def tv_root(root: Path) -> Path:
    """Where torchvision downloads live: ``<root>/torchvision``."""
    return root / "torchvision"


def cifar10_candidates(root: Path) -> list[Path]:
    """The torchvision CIFAR-10 folder checked under ``root``."""
    return [tv_root(root) / "cifar-10-batches-py"]


def gtsrb_candidates(root: Path) -> list[Path]:
    """The torchvision GTSRB folder checked under ``root``."""
    return [tv_root(root) / "gtsrb" / "GTSRB" / "Training"]


def _probe(url: str) -> None:
    reason = host_reachable(url)
    if reason is not None:
        raise OSError(reason)


def load_cifar10(root: Path, *, image_size: int, download: bool) -> RawSplits:
    """CIFAR-10 (50k/10k) via torchvision; raises OSError/RuntimeError when unavailable."""
    if download:
        _probe(CIFAR10_URL)
    from torchvision.datasets import CIFAR10  # noqa: PLC0415 - slow import, optional source

    sets = {}
    for split, train in (("train", True), ("test", False)):
        data = CIFAR10(str(tv_root(root)), train=train, download=download)
        images = resize_batch(to_nchw(np.asarray(data.data)), image_size)
        sets[split] = ImageSet(images=images, labels=torch.tensor(data.targets, dtype=torch.int64))
    return RawSplits(classes=CIFAR10_CLASSES, channels=3, train=sets["train"],
                     test=sets["test"], val=None, location=str(cifar10_candidates(root)[0]))


def _gtsrb_files(root: Path, split: str, *, download: bool) -> tuple[list[Path], np.ndarray]:
    """The ``.ppm`` paths and labels of one GTSRB split."""
    from torchvision.datasets import GTSRB  # noqa: PLC0415 - optional source

    data = GTSRB(str(tv_root(root)), split=split, download=download)
    paths = [Path(p) for p, _ in data._samples]  # noqa: SLF001 - no public accessor
    return paths, np.array([t for _, t in data._samples], dtype=np.int64)  # noqa: SLF001


def _gtsrb_set(paths: list[Path], labels: np.ndarray, decoded: Decoded, *,
               split: str) -> ImageSet:
    """The readable files of one split; train gets ``track`` (one physical sign)."""
    keep = decoded.keep_mask(len(paths))
    meta = {}
    if split == "train":
        kept = [p for p, ok in zip(paths, keep) if ok]
        meta["track"] = np.array([f"{p.parent.name}_{p.name.split('_')[0]}" for p in kept])
    return ImageSet(images=decoded.images, labels=torch.from_numpy(labels[keep]),
                    metadata=meta)


def load_gtsrb(root: Path, *, image_size: int, download: bool,
               on_corrupt: str = "refuse") -> RawSplits:
    """GTSRB (26,640 / 12,630) via torchvision; raises OSError/RuntimeError when unavailable.

    ``on_corrupt`` (``data.on_corrupt``): ``refuse`` unreadable ``.ppm`` files with one
    :class:`~fedimg.errors.DataError` naming them all, or ``skip`` them (they are
    named in ``RawSplits.warnings``).
    """
    if download:
        _probe(GTSRB_URL)
    directory = tv_root(root) / "gtsrb"
    sets, corrupt, total = {}, {}, 0
    for split in ("train", "test"):
        paths, labels = _gtsrb_files(root, split, download=download)
        decoded = decode_files(paths, directory=directory, image_size=image_size)
        corrupt.update(decoded.named([p.relative_to(directory).as_posix() for p in paths]))
        total += len(paths)
        sets[split] = (paths, labels, decoded)
    warning = apply_corrupt_policy(corrupt, total=total, where=str(directory),
                                   on_corrupt=on_corrupt)
    train, test = (_gtsrb_set(*sets[s], split=s) for s in ("train", "test"))
    return RawSplits(classes=GTSRB_CLASSES, channels=3, train=train, test=test, val=None,
                     location=str(directory), warnings=(warning,) if warning else ())
