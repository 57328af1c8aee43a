"""Central evaluation: the global model on the server's held-out test split (plain PyTorch).

When the test split has a ``data.site_column`` (default ``site``), each site's rows are
also scored on their own, from the same forward pass: ``test/site/<name>/<metric>``
beside the pooled ``test/<metric>``, as FLamby reports a natural federation (Ogier du
Terrail et al. 2022, "FLamby: Datasets and Benchmarks for Cross-Silo Federated
Learning in Realistic Healthcare Settings", NeurIPS).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import torch

from fedimg.config import FedimgConfig
from fedimg.data import Dataset, ImageSet, InMemoryLoader, build_transform
from fedimg.models import build_model
from fedimg.training import TrunkCache, predict, resolve_device, scores

logger = logging.getLogger(__name__)

MAX_SITES = 64  # more distinct values than this: not a site column (e.g. a patient id)


def site_key(name: str) -> str:
    """A site's name as a metric-key segment: letters, digits, ``_ . -``; others ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def site_rows(test: ImageSet, column: str | None) -> dict[str, np.ndarray]:
    """Row indices of each site of ``test`` (sorted by key); {} if no such column."""
    if not column or column not in test.metadata:
        if column:
            logger.info("no per-site test metrics: the test split has no column '%s' "
                        "(data.site_column; its columns: %s)", column,
                        sorted(test.metadata) or "none")
        return {}
    values = np.asarray(test.metadata[column]).astype(str)
    names = sorted(set(values.tolist()))
    if len(names) > MAX_SITES:
        logger.warning("data.site_column=%s has %d values in the test split (> %d): no "
                       "per-site test metrics", column, len(names), MAX_SITES)
        return {}
    return {site_key(n): np.flatnonzero(values == n) for n in names}


class CentralEvaluator:
    """Evaluates global weights on the held-out test split (server side), and per site."""

    def __init__(self, cfg: FedimgConfig, dataset: Dataset) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.num_classes = dataset.num_classes
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, num_classes=dataset.num_classes,
                                 weights="none", transfer=cfg.transfer).to(self.device)
        test = dataset.test
        self.sites = site_rows(test, cfg.data.site_column)
        self.loader = InMemoryLoader(
            test.images, test.labels, indices=np.arange(len(test.labels)),
            batch_size=cfg.train.eval_batch_size, shuffle=False, seed=cfg.seed,
            transform=build_transform("none", image_size=cfg.data.image_size, train=False))
        # head / last_k: the test split's frozen-trunk features, computed once per trunk
        self.cache = TrunkCache.build(self.model, cfg=cfg, device=self.device)

    def __call__(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state, strict=True)
        amp = self.cfg.train.amp
        model, loader = self.cache.eval_inputs(0, self.loader, amp=amp, split="test") or \
            (self.model, self.loader)
        predicted = predict(model, loader, device=self.device, amp=amp)
        if predicted is None:
            return {}
        logits, labels = predicted  # (N, K), (N,) in test-split order
        out = _prefixed("test/", scores(logits, labels, num_classes=self.num_classes))
        for name, rows in self.sites.items():
            index = torch.as_tensor(rows, device=logits.device)
            site = scores(logits[index], labels[index], num_classes=self.num_classes)
            out.update(_prefixed(f"test/site/{name}/", site))
        return out


def _prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if k != "num_examples"}
