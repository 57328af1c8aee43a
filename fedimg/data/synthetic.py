"""Seeded, class-conditional synthetic images (``dataset=synthetic`` and the fallback).

Each class k has a template: a colour (or grey-level) offset and a texture made
of three sinusoidal gratings with class-specific orientations and frequencies.
A sample adds a random phase per grating, a random contrast and Gaussian pixel
noise, so a small CNN separates the classes well above chance within a few
steps, while no two samples are identical. The same seed gives the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from fedimg.data.decode import resize_batch
from fedimg.data.types import ImageSet, RawSplits

_GRATINGS = 3
_CHUNK = 1024


def _class_params(num_classes: int, channels: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    params = {
        "theta": rng.uniform(0, np.pi, (num_classes, _GRATINGS)),
        "freq": rng.uniform(1.0, 5.0, (num_classes, _GRATINGS)),
        "colour": rng.uniform(-1.0, 1.0, (num_classes, channels)),
        "weight": rng.uniform(0.4, 1.0, (num_classes, channels)),
    }
    return {k: v.astype(np.float32) for k, v in params.items()}


def _render(labels: np.ndarray, params: dict[str, np.ndarray], *, size: int,
            rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, C, size, size) images of the classes in ``labels``."""
    n, channels = len(labels), params["colour"].shape[1]
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    theta, freq = params["theta"][labels], params["freq"][labels]          # (N, G)
    phase = rng.uniform(0, 2 * np.pi, (n, _GRATINGS)).astype(np.float32)
    proj = (np.cos(theta)[:, :, None, None] * xx + np.sin(theta)[:, :, None, None] * yy)
    texture = np.sin(np.float32(2 * np.pi) * freq[:, :, None, None] * proj
                     + phase[:, :, None, None]).mean(axis=1)                # (N, S, S)
    contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32)
    colour = params["colour"][labels][:, :, None, None]                     # (N, C, 1, 1)
    weight = params["weight"][labels][:, :, None, None]
    pixels = (128 + 45 * colour + 70 * contrast * weight * texture[:, None]
              + 20 * rng.standard_normal((n, channels, size, size), dtype=np.float32))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _split(size_n: int, params: dict[str, np.ndarray], *, gen_size: int, image_size: int,
           rng: np.random.Generator) -> ImageSet:
    num_classes = params["colour"].shape[0]
    labels = rng.permutation(np.arange(size_n) % num_classes)
    chunks = [_render(labels[i:i + _CHUNK], params, size=gen_size, rng=rng)
              for i in range(0, size_n, _CHUNK)]
    images = resize_batch(torch.from_numpy(np.concatenate(chunks)), image_size)
    return ImageSet(images=images, labels=torch.from_numpy(labels.astype(np.int64)))


def make_synthetic(*, classes: tuple[str, ...], channels: int, train_size: int,
                   test_size: int, gen_size: int, image_size: int, seed: int) -> RawSplits:
    """A balanced synthetic dataset with the given class names and channel count.

    Images are drawn at ``gen_size`` px and resized to ``image_size``. There is
    no validation split (``val=None``).
    """
    params = _class_params(len(classes), channels, seed)
    train = _split(train_size, params, gen_size=gen_size, image_size=image_size,
                   rng=np.random.default_rng([seed, 1]))
    test = _split(test_size, params, gen_size=gen_size, image_size=image_size,
                  rng=np.random.default_rng([seed, 2]))
    return RawSplits(classes=classes, channels=channels, train=train, test=test, val=None,
                     location=f"synthetic(seed={seed}, classes={len(classes)}, "
                              f"channels={channels}, size={gen_size})")
