"""Decode image files once, resize once, and cache the decoded pixels.

Every simulation worker loads the dataset, so decoding ~10k JPEGs per process
would dominate start-up. :func:`decode_files` keeps a ``.npy`` of the decoded
pixels under ``<user cache dir>/decoded``, keyed by the dataset directory and
the (path, size, mtime) of every file, so an edited file invalidates it. When all
images share one small size (CIFAR-10, GTSRB subset: 32 px) the cache holds them
at native size and serves every ``image_size``; otherwise it holds them resized
(the key includes the size). Resizing is bilinear with antialiasing (PIL for single
images, :func:`torch.nn.functional.interpolate` for batches).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fedimg.data.roots import user_cache_dir
from fedimg.errors import DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
NATIVE_MAX = 64  # uniform images up to this size are cached once for every image_size
_CHUNK = 2048


def to_nchw(array: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) numpy images as a (N, C, H, W) tensor."""
    if array.ndim == 3:
        array = array[:, :, :, None]
    if array.ndim != 4:
        raise DataError(f"expected images of shape (N, H, W[, C]); got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) to (N, C, size, size), bilinear + antialias, in chunks."""
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        # uint8 + channels_last takes torch's fast integer kernel (~20x the float one).
        chunk = images[start:start + _CHUNK].contiguous(memory_format=torch.channels_last)
        out[start:start + _CHUNK] = F.interpolate(chunk, size=(size, size), mode="bilinear",
                                                  align_corners=False, antialias=True)
    return out


def _listing(directory: Path, paths: list[Path]) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file: the identity of the decoded pixels."""
    prefix = len(str(directory)) + 1
    out = []
    for path in paths:
        stat = os.stat(path)
        out.append((str(path)[prefix:], stat.st_size, stat.st_mtime_ns))
    return out


def _key(directory: Path, listing: list[tuple[str, int, int]], extra: str) -> str:
    blob = json.dumps([CACHE_VERSION, str(directory.resolve()), extra, listing])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_cache(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("ignoring unreadable decode cache %s (%s)", path, exc)
        return None


def _write_cache(path: Path, array: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop training
        logger.warning("could not write decode cache %s (%s)", path, exc)


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("L" if im.mode in GREY_MODES else "RGB")


def _decode_all(paths: list[Path], size: int) -> tuple[np.ndarray, bool]:
    """Decode ``paths`` to NHWC; returns (array, whether it is at native size).

    Small images that all share one size (<= 64 px) stay native; otherwise every
    image is resized to ``size`` as it is decoded, bounding memory.
    """
    arrays: list[np.ndarray] = []
    bad: list[str] = []
    native: tuple[int, int] | None = None
    uniform = True
    for path in paths:
        try:
            im = _open(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            bad.append(f"{path} ({type(exc).__name__}: {exc})")
            continue
        native = native or im.size
        if uniform and (im.size != native or max(im.size) > NATIVE_MAX):
            arrays = [_pil_resize(a, size) for a in arrays]
            uniform = False
        arrays.append(np.asarray(im) if uniform else _pil_resize(np.asarray(im), size))
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  (+{len(bad) - 10} more)" if len(bad) > 10 else "")
        raise DataError(f"{len(bad)} image file(s) could not be decoded:\n  {shown}\n"
                        "Fix: delete or replace these files (re-download the dataset).")
    return _stack(arrays), uniform


def _pil_resize(array: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack HW / HWC arrays into NHWC; greyscale ones are repeated if any is RGB."""
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
        return np.stack(arrays)
    return np.stack(arrays)[:, :, :, None]


def decode_files(paths: list[Path], *, directory: Path, image_size: int,
                 use_cache: bool = True) -> torch.Tensor:
    """Decode image files to uint8 (N, C, image_size, image_size), via the decode cache.

    C is 1 when every file is greyscale, else 3. Corrupt or unreadable files raise
    one :class:`DataError` listing all of them.
    """
    if not paths:
        raise DataError(f"no image files found under {directory}")
    cache = user_cache_dir() / "decoded"
    listing = _listing(directory, paths)
    native_path = cache / f"{directory.name}-{_key(directory, listing, 'native')}.npy"
    sized_path = cache / f"{directory.name}-{_key(directory, listing, str(image_size))}.npy"
    array = _read_cache(native_path) if use_cache else None
    if array is None and use_cache:
        array = _read_cache(sized_path)
    if array is None or len(array) != len(paths):
        array, native = _decode_all(paths, image_size)
        if use_cache:
            _write_cache(native_path if native else sized_path, array)
    return resize_batch(to_nchw(array), image_size)
