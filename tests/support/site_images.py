"""Tiny site image folders for deployment tests: one PNG folder per class name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_site_images(folder: Path, *, classes: Sequence[str], per_class: int,
                      seed: int) -> None:
    """PNGs whose mean colour depends on the class, so a model can learn something."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((24, 24, 3)) + 60.0
            base[..., k % 3] += 120.0
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{seed}_{i}.png")
