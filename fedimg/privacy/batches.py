"""The logical batches of a DP-SGD round: Poisson sampling, or shuffled fixed-size batches.

Poisson sampling with rate q (each sample independently, every step) is what the
privacy accountants assume (Abadi et al. 2016; Mironov et al. 2019). Under
``privacy.secure_noise`` the draws come from a fresh ChaCha20 keystream
(:mod:`fedimg.privacy.secure_noise`) instead of a torch generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fedimg.data import InMemoryLoader
from fedimg.privacy.secure_noise import ChaChaStream, SecurePoissonSampler


class ShuffledBatches:
    """``steps`` fixed-size batches of positions, reshuffled every pass (no Poisson)."""

    def __init__(self, n: int, batch_size: int, steps: int,
                 generator: torch.Generator | ChaChaStream) -> None:
        self.n, self.batch_size, self.steps, self.generator = n, min(batch_size, n), steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        order: list[int] = []
        for _ in range(self.steps):
            if len(order) < self.batch_size:
                secure = isinstance(self.generator, ChaChaStream)
                order = (self.generator.randperm(self.n) if secure
                         else torch.randperm(self.n, generator=self.generator)).tolist()
            batch, order = order[:self.batch_size], order[self.batch_size:]
            yield batch


def private_batches(loader: InMemoryLoader, *, rate: float, steps: int,
                    generator: torch.Generator, poisson: bool = True,
                    secure: bool = False) -> DataLoader:
    """``steps`` logical batches over ``loader``'s partition (same transform).

    Poisson sampling (each sample independently with probability ``rate``) is what
    the accountants assume; ``poisson=False`` draws shuffled batches of the expected
    size instead, for which the reported epsilon is only the usual approximation.
    ``secure`` draws either from a fresh :class:`ChaChaStream`, not ``generator``.
    """
    images, labels, indices = loader.images, loader.labels, loader.indices
    empty_x = loader.transform(images[torch.from_numpy(indices[:1])])[:0]  # (0, C, S, S)

    def collate(positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not positions:
            return empty_x, labels[:0]
        idx = torch.from_numpy(indices[np.asarray(positions)])
        return loader.transform(images[idx]), labels[idx]

    if poisson and secure:  # each stream: a fresh secret key
        sampler: Any = SecurePoissonSampler(num_samples=len(indices), sample_rate=rate,
                                            steps=steps, stream=ChaChaStream())
    elif poisson:
        sampler = UniformWithReplacementSampler(num_samples=len(indices), sample_rate=rate,
                                                generator=generator, steps=steps)
    else:
        sampler = ShuffledBatches(len(indices), max(1, round(rate * len(indices))), steps,
                                  ChaChaStream() if secure else generator)
    positions: Any = range(len(indices))  # a map-style dataset: position i -> i
    return DataLoader(positions, batch_sampler=sampler, collate_fn=collate)
