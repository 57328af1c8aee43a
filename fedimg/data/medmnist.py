"""MedMNIST v2 2D datasets from the official ``.npz`` files (Yang et al. 2023).

J. Yang et al., "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D
biomedical image classification", Scientific Data 10, 41 (2023). The class names
and md5 sums below are those of the official 28-px release (``medmnist`` 3.0,
Zenodo record 10519652). Multi-label ChestMNIST is not supported.

The file is looked for at ``<root>/<name>/<name>.npz`` then ``<root>/<name>.npz``
and, if absent and downloads are allowed, fetched to the first of those. An md5
that differs from the official one is a warning, not an error (the shared
pneumoniamnist has a modified train split); a truncated or corrupt file is a
:class:`DataError` naming it.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedimg.data.decode import resize_batch, to_nchw
from fedimg.data.roots import download_file, md5sum
from fedimg.data.types import ImageSet, RawSplits
from fedimg.errors import DataError

logger = logging.getLogger(__name__)

URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"
_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
           "liver", "lung-left", "lung-right", "pancreas", "spleen")


@dataclass(frozen=True)
class MedmnistInfo:
    """Official facts about one MedMNIST 2D dataset (28 px)."""

    classes: tuple[str, ...]
    channels: int
    md5: str


INFO: dict[str, MedmnistInfo] = {
    "pathmnist": MedmnistInfo(("adipose", "background", "debris", "lymphocytes", "mucus",
                               "smooth muscle", "normal colon mucosa",
                               "cancer-associated stroma",
                               "colorectal adenocarcinoma epithelium"),
                              3, "a8b06965200029087d5bd730944a56c1"),
    "dermamnist": MedmnistInfo(("actinic keratoses and intraepithelial carcinoma",
                                "basal cell carcinoma", "benign keratosis-like lesions",
                                "dermatofibroma", "melanoma", "melanocytic nevi",
                                "vascular lesions"), 3, "0744692d530f8e62ec473284d019b0c7"),
    "octmnist": MedmnistInfo(("choroidal neovascularization", "diabetic macular edema",
                              "drusen", "normal"), 1, "c68d92d5b585d8d81f7112f81e2d0842"),
    "pneumoniamnist": MedmnistInfo(("normal", "pneumonia"), 1,
                                   "28209eda62fecd6e6a2d98b1501bb15f"),
    "retinamnist": MedmnistInfo(("0", "1", "2", "3", "4"), 3,
                                "bd4c0672f1bba3e3a89f0e4e876791e4"),
    "breastmnist": MedmnistInfo(("malignant", "normal, benign"), 1,
                                "750601b1f35ba3300ea97c75c52ff8f6"),
    "bloodmnist": MedmnistInfo(("basophil", "eosinophil", "erythroblast",
                                "immature granulocytes(myelocytes, metamyelocytes and "
                                "promyelocytes)", "lymphocyte", "monocyte", "neutrophil",
                                "platelet"), 3, "7053d0359d879ad8a5505303e11de1dc"),
    "tissuemnist": MedmnistInfo(("Collecting Duct, Connecting Tubule",
                                 "Distal Convoluted Tubule", "Glomerular endothelial cells",
                                 "Interstitial endothelial cells", "Leukocytes", "Podocytes",
                                 "Proximal Tubule Segments", "Thick Ascending Limb"),
                                1, "ebe78ee8b05294063de985d821c1c34b"),
    "organamnist": MedmnistInfo(_ORGANS, 1, "68e3f8846a6bd62f0c9bf841c0d9eacc"),
    "organcmnist": MedmnistInfo(_ORGANS, 1, "b9ceb9546e10131b32923c5bbeaea2b1"),
    "organsmnist": MedmnistInfo(_ORGANS, 1, "9ab87b696fb54e2a387ebe992d6ed5f1"),
}


def candidates(root: Path, name: str) -> list[Path]:
    """Paths checked for ``name``, in order."""
    return [root / name / f"{name}.npz", root / f"{name}.npz"]


def download(root: Path, name: str) -> Path:
    """Fetch the official npz to ``<root>/<name>/<name>.npz``; raises OSError offline."""
    dest = candidates(root, name)[0]
    download_file(URL.format(name=name), dest)
    return dest


SPLIT_KEYS = tuple(f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels"))


def read_npz(path: Path, *, required: tuple[str, ...] = SPLIT_KEYS,
             optional: tuple[str, ...] = (), fix: str | None = None) -> dict[str, np.ndarray]:
    """The ``required`` arrays of an npz (and those of ``optional`` present), or a DataError.

    ``fix`` ends the message about a missing key or a corrupt file (default: fetch
    the official MedMNIST file again).
    """
    fix = fix or f"Fix: delete it and download it again ({URL.format(name=path.stem)})."
    if path.stat().st_size == 0:
        raise DataError(f"{path} is truncated or corrupt: it is empty (0 bytes), e.g. from "
                        f"an interrupted download. {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise DataError(f"{path} is not a MedMNIST-style npz: missing {missing} "
                                f"(found {npz.files}). {fix}")
            return {k: npz[k] for k in (*required, *optional) if k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise DataError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}). "
                        f"{fix}") from exc


def flat_labels(arrays: dict[str, np.ndarray], split: str, *, path: Path) -> np.ndarray:
    """``<split>_labels`` as int64 (N,); (N, 1) is flattened, multi-label is refused."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] != 1 or len(labels) != len(images):
        raise DataError(f"{path}: {split}_labels has shape {arrays[f'{split}_labels'].shape}"
                        f" for {len(images)} images; expected ({len(images)}, 1) "
                        "(multi-label sets such as chestmnist are not supported)")
    return labels[:, 0].astype(np.int64)


def image_set(arrays: dict[str, np.ndarray], split: str, *, image_size: int,
              num_classes: int, path: Path) -> ImageSet:
    """One split of an npz as an :class:`ImageSet` resized to ``image_size``."""
    flat = flat_labels(arrays, split, path=path)
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise DataError(f"{path}: {split} labels span [{flat.min()}, {flat.max()}] but the "
                        f"dataset has {num_classes} classes")
    images = arrays[f"{split}_images"].astype(np.uint8, copy=False)
    tensor = resize_batch(to_nchw(images), image_size)
    return ImageSet(images=tensor, labels=torch.from_numpy(flat))


def load(path: Path, name: str, *, image_size: int) -> RawSplits:
    """Decode a MedMNIST npz (resized to ``image_size``), warning on an md5 mismatch."""
    info = INFO[name]
    warnings = []
    arrays = read_npz(path)  # first: a corrupt file is an error, not an md5 warning
    digest = md5sum(path)
    if digest != info.md5:
        message = (f"{path} has md5 {digest}, not the official {info.md5}: it differs from "
                   "the MedMNIST release, so results are not comparable to published ones")
        logger.warning(message)
        warnings.append(message)
    sets = {s: image_set(arrays, s, image_size=image_size, num_classes=len(info.classes),
                      path=path) for s in ("train", "val", "test")}
    channels = int(sets["train"].images.shape[1])
    if channels != info.channels:
        warnings.append(f"{path} has {channels} channels; MedMNIST {name} has {info.channels}")
    return RawSplits(classes=info.classes, channels=channels, train=sets["train"],
                     test=sets["test"], val=sets["val"], location=str(path),
                     warnings=tuple(warnings))
