"""Value types of the data package: decoded image sets and their provenance.

Everything is decoded once into memory: an :class:`ImageSet` holds uint8 images
already resized to the model resolution, so training only pays for augmentation
and normalisation (see :mod:`fedimg.data.transforms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fedimg.errors import DataError

SOURCES = ("real", "synthetic", "synthetic-fallback")


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class ImageSet:
    """One split: ``images`` uint8 (N, C, S, S), ``labels`` int64 (N,), per-sample metadata.

    ``metadata`` maps a column name (e.g. ``"site"``, ``"track"``,
    ``"source_image"``) to an array of N values aligned with the images; it may
    be empty.
    """

    images: torch.Tensor
    labels: torch.Tensor
    metadata: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"ImageSet.images must be uint8 (N, C, S, S); got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[1] not in (1, 3):
            raise DataError(f"ImageSet.images must have 1 or 3 channels; got "
                            f"{self.images.shape[1]}")
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (n,):
            raise DataError(f"ImageSet.labels must be int64 ({n},); got "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")
        for name, column in self.metadata.items():
            if len(column) != n:
                raise DataError(f"metadata column '{name}' has {len(column)} values "
                                f"for {n} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        """Side length S of the square images."""
        return int(self.images.shape[-1])

    def subset(self, indices: np.ndarray) -> ImageSet:
        """The samples at ``indices`` (in that order), metadata included."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        meta = {k: v[np.asarray(indices, dtype=np.int64)] for k, v in self.metadata.items()}
        return ImageSet(images=self.images[idx], labels=self.labels[idx], metadata=meta)


@dataclass(frozen=True)
class Provenance:
    """Where a dataset really came from; saved with every run.

    ``source`` is ``"real"``, ``"synthetic"`` (asked for) or
    ``"synthetic-fallback"`` (the real data was missing and ``data.source=auto``;
    ``fallback_reason`` says why). ``warnings`` collects non-fatal findings such
    as an md5 that differs from the official release.
    """

    source: str
    location: str
    fallback_reason: str | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"Provenance.source='{self.source}' is unknown; valid: "
                            f"{', '.join(SOURCES)}")


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class Dataset:
    """A decoded dataset: class names, channel count, splits and provenance."""

    name: str
    classes: tuple[str, ...]
    channels: int
    train: ImageSet
    test: ImageSet
    val: ImageSet | None
    provenance: Provenance

    @property
    def num_classes(self) -> int:
        """Number of classes (the width of the model head)."""
        return len(self.classes)


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class RawSplits:
    """What a source loader returns before subsampling: splits plus their origin."""

    classes: tuple[str, ...]
    channels: int
    train: ImageSet
    test: ImageSet
    val: ImageSet | None
    location: str
    warnings: tuple[str, ...] = ()
