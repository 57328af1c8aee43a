"""A re-iterable mini-batch loader over images already decoded in memory.

Decoding and resizing happened once at load time, so a batch costs one gather of
uint8 pixels plus the batch transform; no worker processes are needed (a
``torch.utils.data.DataLoader`` would add per-sample collation for nothing).
Each ``iter()`` is one epoch with its own seeded shuffle: epoch e uses
``numpy.random.default_rng([seed, e])``, so runs are reproducible and epochs differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from fedimg.data.transforms import build_transform
from fedimg.errors import ConfigError

Transform = Callable[[torch.Tensor], torch.Tensor]


class InMemoryLoader:
    """Batches ``(x float32 (B, 3, S, S), y int64 (B,))`` of ``images[indices]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, indices: np.ndarray,
                 batch_size: int, transform: Transform | None, shuffle: bool, seed: int,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(images)):
            raise ConfigError(f"indices span [{self.indices.min()}, {self.indices.max()}] but "
                              f"there are only {len(images)} images")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.transform = transform or build_transform("none", image_size=images.shape[-1],
                                                      train=False)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    @property
    def num_examples(self) -> int:
        """Samples this loader covers per epoch (before ``drop_last``)."""
        return int(len(self.indices))

    def __len__(self) -> int:
        n = len(self.indices)
        if self.drop_last:
            return n // self.batch_size
        batches = math.ceil(n / self.batch_size)
        # A trailing batch of one sample joins the previous batch: BatchNorm in train
        # mode cannot normalise a single sample (it would fail on 1x1 feature maps).
        return batches - 1 if batches > 1 and n % self.batch_size == 1 else batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        self.epoch += 1
        last = len(self) - 1
        for b in range(len(self)):
            stop = len(order) if b == last and not self.drop_last else (b + 1) * self.batch_size
            idx = torch.from_numpy(order[b * self.batch_size:stop])
            yield self.transform(self.images[idx]), self.labels[idx]
