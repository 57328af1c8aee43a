"""Frozen-trunk feature caching: train and evaluate the tail on features computed once.

With ``transfer.mode=head|last_k`` the network's frozen trunk is a function of the
image alone (:func:`fedimg.models.split.split_model`). A :class:`TrunkCache` runs it
once per image and keeps the features; training and evaluation then run only the
trainable tail, on a loader over the features that batches, shuffles and seeds
exactly as the image loader does (same rows, same order, same ``epoch``).

* ``data.augment=none``: one feature row per image; the cache is exact.
* with augmentation: a bank of K augmented views per image
  (``train.feature_cache_views``), drawn once from a seed of (run, client), and each
  step draws one view per sample from the global torch RNG, which the caller seeds by
  (run, round, client) as for fresh augmentation. A client then sees K fixed views of
  an image rather than a fresh one at every step; over 3 seeds the final accuracy of
  ``cameras`` and ``medical_dp`` stayed within the seed spread (BENCHMARKS.md §15).
* evaluation never augments, so its cache is exact for every model that splits.

Policy (``train.feature_cache``): ``off``; ``auto`` caches evaluation, and training
wherever the trunk is the same in train mode (frozen blocks run without dropout and
stochastic depth: ``fedimg.models.transfer``), from a view bank when augmenting;
``on`` also trains from the eval-mode output of a trunk that still holds a random
layer (a custom model).

Key: a SHA-256 of the model name, the trunk's code, its parameters and buffers, the
client's images (uint8 bytes, in loader order), the transform, the views and their
seed. It is recomputed on every use (about 7 ms per 10 MB), so changed weights or
images are never served from a stale entry: the slot is rebuilt, with a log line
saying what changed. Memory: :class:`FeatureStore` keeps entries in RAM up to
``train.feature_cache_gb`` GiB, spills the rest to memory-mapped files, and refuses
(the caller trains uncached) when the disk has no room either.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedimg.config import FedimgConfig
from fedimg.data import InMemoryLoader
from fedimg.models.split import ModelSplit, SplitRefused, module_mode, split_model
from fedimg.seeds import derive_seed
from fedimg.training.device import amp_dtype, autocast

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")  # train.feature_cache
GIB = 1 << 30
_SPILL_MARGIN = 1.25  # disk free space needed per spilled byte


@dataclass(frozen=True)
class CachePlan:
    """Whether training and evaluation read cached features, and why (one line)."""

    train: bool
    evaluate: bool
    views: int  # feature rows per image: 1 without augmentation, else the bank size
    reason: str


def plan_cache(cfg: FedimgConfig, split: ModelSplit | None, refused: str = "") -> CachePlan:
    """What ``train.feature_cache`` does for ``cfg`` with this ``split`` (None: refused)."""
    t = cfg.train
    if t.feature_cache == "off" or t.feature_cache_gb == 0 or split is None:
        why = refused or ("train.feature_cache_gb=0" if t.feature_cache != "off"
                          else "train.feature_cache=off")
        return CachePlan(False, False, 1, why)
    views = t.feature_cache_views if cfg.data.augment != "none" else 1
    deviations = _deviations(cfg, split, views)
    if t.feature_cache == "on" or split.exact:
        return CachePlan(True, True, views,
                         f"training from {deviations}" if deviations else "exact")
    return CachePlan(False, True, 1, f"training uncached: a cache would use {deviations}"
                     "; train.feature_cache=on accepts that")


def _deviations(cfg: FedimgConfig, split: ModelSplit, views: int) -> str:
    """How training from the cache would differ from training without it ("" = exact)."""
    found = []
    if views > 1:
        found.append(f"a bank of {views} augmented views per image, not fresh draws "
                     f"(data.augment={cfg.data.augment})")
    if not split.exact:
        more = ", ..." if len(split.stochastic) > 2 else ""
        found.append(f"the trunk's eval-mode output ({len(split.stochastic)} layers random in "
                     f"train mode: {', '.join(split.stochastic[:2])}{more})")
    return "; ".join(found)


# --- the key --------------------------------------------------------------------------


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What a slot's features are a function of: trunk weights, images, settings."""

    weights: str
    images: str
    settings: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.weights}{self.images}{self.settings}".encode()).hexdigest()

    def changes(self, old: CacheKey | None) -> str:
        """What differs from ``old``, for the log line."""
        what = {"weights": "frozen trunk weights changed", "images": "images changed",
                "settings": "transform or view settings changed"}
        changed = [text for name, text in what.items()
                   if old is not None and getattr(self, name) != getattr(old, name)]
        return " and ".join(changed) or "first use"


# --- storage --------------------------------------------------------------------------


@dataclass
class _Entry:
    key: CacheKey
    features: torch.Tensor  # (N, ...) or (N, K, ...), on the CPU
    spilled: bool


@dataclass
class FeatureStore:
    """Feature tensors by slot, within ``budget_bytes`` of RAM; the rest memory-mapped."""

    budget_bytes: int
    spill_dir: Path | None = None  # None: the system temp dir
    _entries: dict[object, _Entry] = field(default_factory=dict)

    @property
    def ram_bytes(self) -> int:
        return sum(e.features.nbytes for e in self._entries.values() if not e.spilled)

    def get(self, slot: object, key: CacheKey) -> torch.Tensor | None:
        entry = self._entries.get(slot)
        return entry.features if entry is not None and entry.key == key else None

    def last_key(self, slot: object) -> CacheKey | None:
        entry = self._entries.get(slot)
        return entry.key if entry is not None else None

    def allocate(self, slot: object, key: CacheKey, shape: tuple[int, ...],
                 label: str) -> torch.Tensor | None:
        """An empty float32 tensor for ``slot`` (its old entry dropped), or None (logged)."""
        self._entries.pop(slot, None)
        need = int(np.prod(shape)) * 4
        if self.ram_bytes + need <= self.budget_bytes:
            out, spilled = torch.empty(shape), False
        else:
            out, spilled = self._spill(shape, need, label), True
            if out is None:
                return None
        self._entries[slot] = _Entry(key, out, spilled)
        return out

    def _spill(self, shape: tuple[int, ...], need: int, label: str) -> torch.Tensor | None:
        root = Path(self.spill_dir or tempfile.gettempdir()) / "fedimg-feature-cache"
        budget = f"{self.budget_bytes / GIB:g} GiB ({self.ram_bytes / GIB:.2f} in use)"
        try:
            root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(root).free
            if free < need * _SPILL_MARGIN:
                raise OSError(f"only {free / GIB:.2f} GiB free")
            with tempfile.NamedTemporaryFile(dir=root, suffix=".f32", delete=False) as f:
                path = Path(f.name)
            mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=shape)
            path.unlink()  # the mapping lives on; the space is freed when it is dropped
        except OSError as exc:
            logger.warning("feature cache: %s needs %.2f GiB, beyond train.feature_cache_gb="
                           "%s, and cannot spill to %s (%s): training it uncached", label,
                           need / GIB, budget, root, exc)
            return None
        logger.info("feature cache: %s needs %.2f GiB, beyond train.feature_cache_gb=%s: "
                    "spilled to a memory-mapped file in %s", label, need / GIB, budget, root)
        return torch.from_numpy(mapped)

    def drop(self, slot: object) -> None:
        self._entries.pop(slot, None)

    def clear(self) -> None:
        self._entries.clear()


# --- features -------------------------------------------------------------------------


class ViewPicker:
    """Batch transform over a view bank: (B, K, ...) -> (B, ...), one random view each."""

    def __init__(self, views: int) -> None:
        self.views = views

    def __call__(self, bank: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(self.views, (len(bank),))  # the caller seeds the global RNG
        return bank[torch.arange(len(bank)), pick]


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def fill_features(trunk: nn.Module, batches: Iterable[torch.Tensor], out: torch.Tensor, *,
                  device: torch.device, dtype: torch.dtype | None) -> None:
    """Write ``trunk(x)`` of consecutive input batches into the rows of ``out``."""
    row = 0
    with torch.inference_mode(), module_mode(trunk, training=False), autocast(device, dtype):
        for x in batches:
            features = trunk(x.to(device, non_blocking=True)).float().cpu()
            out[row:row + len(features)] = features
            row += len(features)


def _image_chunks(loader: InMemoryLoader, size: int) -> Iterable[torch.Tensor]:
    """The loader's uint8 images (B, C, H, W) in index order, ``size`` at a time."""
    for lo in range(0, len(loader.indices), size):
        yield loader.images[torch.from_numpy(loader.indices[lo:lo + size])]


def _feature_loader(features: torch.Tensor, loader: InMemoryLoader, *,
                    views: int) -> InMemoryLoader:
    """A loader over ``features`` with ``loader``'s rows, labels, batches, seed and epoch."""
    labels = loader.labels[torch.from_numpy(loader.indices)]
    cached = InMemoryLoader(features, labels, indices=np.arange(len(labels)),
                            batch_size=loader.batch_size,
                            transform=ViewPicker(views) if views > 1 else _same,
                            shuffle=loader.shuffle, seed=loader.seed, drop_last=loader.drop_last)
    cached.epoch = loader.epoch  # shuffles permute positions alike: the same rows per batch
    return cached


class TrunkCache:
    """One environment's cached trunk features, per client, split and precision."""

    def __init__(self, split: ModelSplit | None, plan: CachePlan, *, cfg: FedimgConfig,
                 device: torch.device, store: FeatureStore) -> None:
        self.split, self.plan, self.cfg = split, plan, cfg
        self.device, self.store = device, store
        self.builds = 0  # slots computed (first use or a changed key): a test and bench handle

    @classmethod
    def build(cls, model: nn.Module, *, cfg: FedimgConfig, device: torch.device,
              spill_dir: Path | None = None) -> TrunkCache:
        """Split ``model`` if ``cfg`` asks for caching; log the plan in one line."""
        split, refused, t = None, "", cfg.train
        if cfg.transfer.mode == "full":
            refused = "transfer.mode=full trains every layer: nothing to cache"
        elif t.feature_cache != "off" and t.feature_cache_gb > 0:
            size = cfg.data.image_size
            probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            try:
                with torch.random.fork_rng(devices=[]):
                    split = split_model(model, probe=probe.to(device))
            except SplitRefused as exc:
                refused = f"{exc}; training and evaluating uncached"
        plan = plan_cache(cfg, split, refused)
        logger.info("feature cache (train.feature_cache=%s, model=%s): training %s, "
                    "evaluation %s: %s", t.feature_cache, cfg.model,
                    "cached" if plan.train else "uncached",
                    "cached" if plan.evaluate else "uncached", plan.reason)
        return cls(split, plan, cfg=cfg, device=device,
                   store=FeatureStore(int(t.feature_cache_gb * GIB), spill_dir))

    def train_inputs(self, client: int, loader: InMemoryLoader, *, amp: bool
                     ) -> tuple[nn.Module, InMemoryLoader] | None:
        """The tail and a loader of cached training features, or None (train uncached)."""
        if not self.plan.train or self.split is None or not len(loader.indices):
            return None
        features = self._features(("train", client, amp), loader, train=True, amp=amp)
        if features is None:
            return None
        return self.split.tail, _feature_loader(features, loader, views=self.plan.views)

    def eval_inputs(self, client: int, loader: InMemoryLoader, *, amp: bool,
                    split: str = "val") -> tuple[nn.Module, InMemoryLoader] | None:
        """The tail and a loader of cached evaluation features, or None (uncached).

        ``split``: ``"val"`` (a client's) or ``"test"`` (the server's central test split).
        """
        if not self.plan.evaluate or self.split is None or not len(loader.indices):
            return None
        features = self._features((split, client, amp), loader, train=False, amp=amp)
        if features is None:
            return None
        return self.split.tail, _feature_loader(features, loader, views=1)

    def key(self, loader: InMemoryLoader, *, train: bool, amp: bool, client: int) -> CacheKey:
        """The key of ``loader``'s features now (weights and images hashed afresh)."""
        assert self.split is not None
        h = hashlib.sha256()
        for chunk in _image_chunks(loader, 1024):
            h.update(memoryview(chunk.contiguous().numpy()).cast("B"))
        settings = {"model": self.cfg.model, "boundary": self.split.boundary,
                    "trunk": self.split.trunk.code, "transform": repr(loader.transform),
                    "train": train, "views": self.plan.views if train else 1,
                    "bank_seed": self._bank_seed(client), "chunk": self._chunk(loader),
                    "dtype": str(amp_dtype(self.device, enabled=amp)),
                    "indices": hashlib.sha256(loader.indices.tobytes()).hexdigest()}
        return CacheKey(weights=tensor_digest(self.split.trunk_state()), images=h.hexdigest(),
                        settings=json.dumps(settings, sort_keys=True))

    def _bank_seed(self, client: int) -> int:
        return derive_seed(self.cfg.seed, 16, client)  # 16: this stream's tag (issue 16)

    def _chunk(self, loader: InMemoryLoader) -> int:
        return max(loader.batch_size, self.cfg.train.eval_batch_size)

    def _features(self, slot: tuple[str, int, bool], loader: InMemoryLoader, *, train: bool,
                  amp: bool) -> torch.Tensor | None:
        """The slot's features for ``loader``: from the store, or computed now (logged)."""
        key = self.key(loader, train=train, amp=amp, client=slot[1])
        found = self.store.get(slot, key)
        if found is not None:
            return found
        assert self.split is not None
        started, old = time.perf_counter(), self.store.last_key(slot)
        views, n, shape = self.plan.views if train else 1, len(loader.indices), \
            self._feature_shape(loader)
        label = ("the test split's features" if slot[0] == "test"
                 else f"client {slot[1]} {slot[0]} features")
        out = self.store.allocate(slot, key, (n, views, *shape) if views > 1 else (n, *shape),
                                  label)
        if out is None:
            return None
        try:
            self._fill(out, loader, train=train, views=views, amp=amp, client=slot[1])
        except BaseException:
            self.store.drop(slot)  # never keep a half-filled entry under a valid key
            raise
        self.builds += 1
        logger.info("feature cache: %s built (%s): %d images x %d view(s) -> %s, %.1f MB, "
                    "%.2fs", label, key.changes(old), n, views, shape, out.nbytes / 2**20,
                    time.perf_counter() - started)
        return out

    def _feature_shape(self, loader: InMemoryLoader) -> tuple[int, ...]:
        """The trunk's output shape for one image of ``loader`` (global RNG untouched)."""
        assert self.split is not None
        first = next(iter(_image_chunks(loader, 1)))
        with torch.random.fork_rng(devices=[]), torch.inference_mode(), \
                module_mode(self.split.trunk, training=False):
            return tuple(self.split.trunk(loader.transform(first).to(self.device)).shape[1:])

    def _fill(self, out: torch.Tensor, loader: InMemoryLoader, *, train: bool, views: int,
              amp: bool, client: int) -> None:
        """Evaluation: the loader's own batches. Training: ``views`` seeded passes."""
        assert self.split is not None
        fill = functools.partial(fill_features, self.split.trunk, device=self.device,
                                 dtype=amp_dtype(self.device, enabled=amp))
        if not train:
            fill((x for x, _ in loader), out)
            return
        # manual_seed also seeds CUDA: fork its generator too, or the tail's dropout in
        # a round that rebuilt the cache would draw from the bank's seed on a GPU
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self._bank_seed(client))
            for v in range(views):
                rows = out[:, v] if views > 1 else out
                fill((loader.transform(c) for c in _image_chunks(loader, self._chunk(loader))),
                     rows)
