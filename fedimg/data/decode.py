"""Decode image files once, resize once, and cache the decoded pixels.

Every simulation worker loads the dataset, so decoding ~10k JPEGs per process
would dominate start-up. :func:`decode_files` keeps a ``.npy`` of the decoded
pixels under ``<user cache dir>/decoded``, keyed by the dataset directory and
the (path, size, mtime) of every file, so an edited file invalidates it. When all
images share one small size (CIFAR-10, GTSRB subset: 32 px) the cache holds them
at native size and serves every ``image_size``; otherwise it holds them resized
(the key includes the size). Resizing is bilinear with antialiasing (PIL for single
images, :func:`torch.nn.functional.interpolate` for batches). Greyscale files
stay one channel unless any file of the set is colour (then all are RGB);
16-bit and 32-bit greyscale files (X-rays, microscopy) are stretched from their
own min..max onto 0..255 rather than clipped.

A file that cannot be decoded (empty, truncated, not an image) does not stop the
decoding: :class:`Decoded` holds the pixels of the readable files and the reason
for every other one, and :func:`apply_corrupt_policy` applies ``data.on_corrupt``
(``refuse``: one :class:`DataError` naming them all; ``skip``: a warning, and the
files are dropped). The cache remembers the corrupt files in a ``.corrupt.json``
beside the ``.npy``, so a cache hit never hides one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fedimg.data.roots import user_cache_dir
from fedimg.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: 16-/32-bit greyscale stretched to 8 bit, no longer clipped
GREY_MODES = ("1", "L", "LA", "La")
WIDE_MODES = ("I", "F")  # and every "I;16*": stretched min..max onto 0..255
NATIVE_MAX = 64  # uniform images up to this size are cached once for every image_size
SHOWN_FILES = 10  # corrupt files listed in an error or warning (the rest are counted)
ON_CORRUPT = ("refuse", "skip")
_CHUNK = 2048
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True, eq=False)  # tensors: compare by identity
class Decoded:
    """What :func:`decode_files` returns: pixels of the readable files, reasons for the rest.

    ``images`` is uint8 (N - len(corrupt), C, S, S), in the order of the readable
    paths; ``corrupt`` maps an index into the decoded paths to why it failed.
    """

    images: torch.Tensor
    corrupt: dict[int, str] = field(default_factory=dict)

    def named(self, relpaths: list[str]) -> dict[str, str]:
        """The corrupt files by name: ``relpaths`` (one per decoded path) -> reason."""
        return {relpaths[i]: reason for i, reason in self.corrupt.items()}

    def keep_mask(self, n: int) -> np.ndarray:
        """Boolean mask over the ``n`` decoded paths: True where the file was readable."""
        keep = np.ones(n, dtype=bool)
        keep[list(self.corrupt)] = False
        return keep


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


def _corrupt_path(cache_path: Path) -> Path:
    return cache_path.with_suffix(".corrupt.json")


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, dict[int, str]] | None:
    """Cached pixels and corrupt files for ``n`` paths; None if absent or inconsistent."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
        corrupt: dict[int, str] = {}
        if len(array) < n:  # some files were corrupt: their reasons are in the sidecar
            raw = json.loads(_corrupt_path(path).read_text())
            corrupt = {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, EOFError, AttributeError, TypeError) as exc:
        logger.warning("ignoring unreadable decode cache %s (%s)", path, exc)
        return None
    if len(array) + len(corrupt) != n or any(not 0 <= i < n for i in corrupt):
        return None
    return array, corrupt


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_cache(path: Path, array: np.ndarray, corrupt: dict[int, str]) -> None:
    """Write the sidecar of corrupt files first, so a readable ``.npy`` always has it."""
    try:
        if corrupt:
            blob = json.dumps({str(i): r for i, r in sorted(corrupt.items())}).encode()
            _atomic_write(_corrupt_path(path), lambda handle: handle.write(blob))
        _atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))
    except OSError as exc:  # a read-only home must not stop training
        logger.warning("could not write decode cache %s (%s)", path, exc)


def _open(path: Path) -> Image.Image:
    if os.path.getsize(path) == 0:
        raise OSError("empty file (0 bytes)")
    with Image.open(path) as im:
        return to_8bit(im)


def to_8bit(im: Image.Image) -> Image.Image:
    """``L`` for greyscale (16/32-bit stretched min..max), ``RGB`` for everything else."""
    if im.mode in WIDE_MODES or im.mode.startswith("I;16"):
        return _stretch_to_8bit(np.asarray(im, dtype=np.float64))
    return im.convert("L" if im.mode in GREY_MODES else "RGB")


def decode_images(images: Sequence[Image.Image], *, image_size: int) -> torch.Tensor:
    """In-memory PIL images (any modes and sizes) as uint8 (N, C, S, S), S = image_size.

    The rules of :func:`decode_files`: greyscale stays one channel unless any image is
    colour; each image is resized as it is converted, bilinear with antialiasing.
    """
    if not images:
        raise DataError("no images to decode")
    arrays = [_pil_resize(np.asarray(to_8bit(im)), image_size) for im in images]
    return to_nchw(_stack(arrays))


def _stretch_to_8bit(array: np.ndarray) -> Image.Image:
    """A 16-bit / 32-bit greyscale image mapped min..max onto 0..255.

    PIL's own conversion to ``L`` clips at 255, which turns a 16-bit X-ray (or
    12-bit data stored in 16 bits) white; stretching keeps its contrast.
    """
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.nan_to_num((array - low) * scale).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _reason(path: Path, exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).replace(str(path), path.name)}"


def _decode_all(paths: list[Path], size: int, directory: Path
                ) -> tuple[np.ndarray, bool, dict[int, str]]:
    """Decode ``paths`` to NHWC; returns (array, whether at native size, corrupt files).

    Small images that all share one size (<= 64 px) stay native; otherwise every
    image is resized to ``size`` as it is decoded, bounding memory. Files that
    cannot be decoded are left out of the array and reported by index.
    """
    arrays: list[np.ndarray] = []
    corrupt: dict[int, str] = {}
    native: tuple[int, int] | None = None
    uniform = True
    for i, path in enumerate(paths):
        try:
            im = _open(path)
        except _DECODE_ERRORS as exc:
            corrupt[i] = _reason(path, exc)
            continue
        native = native or im.size
        if uniform and (im.size != native or max(im.size) > NATIVE_MAX):
            arrays = [_pil_resize(a, size) for a in arrays]
            uniform = False
        arrays.append(np.asarray(im) if uniform else _pil_resize(np.asarray(im), size))
    if not arrays:
        entries = [f"{paths[i].name} ({r})" for i, r in corrupt.items()]
        raise DataError(f"none of the {len(paths)} image files under {directory} can be "
                        f"decoded:{list_files(entries)}\nFix: replace the files (download "
                        "the dataset again) or point data.root at a good copy.")
    return _stack(arrays), uniform, corrupt


def list_files(entries: list[str], *, shown: int = SHOWN_FILES) -> str:
    """Indented lines of the first ``shown`` entries, then a count of the rest."""
    more = f"\n  (+{len(entries) - shown} more)" if len(entries) > shown else ""
    return "".join(f"\n  {e}" for e in entries[:shown]) + more


def apply_corrupt_policy(corrupt: dict[str, str], *, total: int, where: str,
                         on_corrupt: str) -> str | None:
    """Apply ``data.on_corrupt`` to ``corrupt`` (relative path -> reason) out of ``total`` files.

    ``refuse`` raises one :class:`DataError` naming every corrupt file; ``skip``
    logs a warning and returns the provenance warning naming them all (None when
    every file was readable). The caller drops the files (:meth:`Decoded.keep_mask`).
    """
    if on_corrupt not in ON_CORRUPT:
        raise ConfigError(f"data.on_corrupt='{on_corrupt}' is unknown; valid: "
                          f"{', '.join(ON_CORRUPT)}")
    if not corrupt:
        return None
    names = sorted(corrupt)
    listing = list_files([f"{name} ({corrupt[name]})" for name in names])
    head = (f"{len(names)} of {total} image files under {where} cannot be decoded "
            "(empty, truncated or not an image)")
    if on_corrupt == "refuse":
        raise DataError(f"{head}:{listing}\nFix: delete or replace these files (e.g. download "
                        "the dataset again), or set data.on_corrupt=skip to train without "
                        "them (they are then listed in results.json).")
    logger.warning("%s; skipping them (data.on_corrupt=skip):%s", head, listing)
    return (f"skipped {len(names)} corrupt image file(s) under {where} (data.on_corrupt="
            f"skip): {', '.join(names)}")


def _pil_resize(array: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack HW / HWC arrays into NHWC; greyscale ones are repeated if any is RGB."""
    if any(a.ndim == 3 for a in arrays):
        arrays = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
        return np.stack(arrays)
    return np.stack(arrays)[:, :, :, None]


def decode_files(paths: list[Path], *, directory: Path, image_size: int,
                 use_cache: bool = True) -> Decoded:
    """Decode image files to uint8 (N, C, image_size, image_size), via the decode cache.

    C is 1 when every file is greyscale, else 3. Files that cannot be decoded are
    left out of :attr:`Decoded.images` and listed in :attr:`Decoded.corrupt`
    (apply :func:`apply_corrupt_policy`); if none can be decoded, a :class:`DataError`.
    """
    if not paths:
        raise DataError(f"no image files found under {directory}")
    cache = user_cache_dir() / "decoded"
    listing = _listing(directory, paths)
    native_path = cache / f"{directory.name}-{_key(directory, listing, 'native')}.npy"
    sized_path = cache / f"{directory.name}-{_key(directory, listing, str(image_size))}.npy"
    hit = None
    if use_cache:
        hit = _read_cache(native_path, len(paths)) or _read_cache(sized_path, len(paths))
    if hit is None:
        array, native, corrupt = _decode_all(paths, image_size, directory)
        if use_cache:
            _write_cache(native_path if native else sized_path, array, corrupt)
    else:
        array, corrupt = hit
    return Decoded(images=resize_batch(to_nchw(array), image_size), corrupt=corrupt)
