"""Central evaluation: the global model on the server's held-out test split (plain PyTorch)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fedimg.config import FedimgConfig
from fedimg.data import Dataset, InMemoryLoader, build_transform
from fedimg.models import build_model
from fedimg.training import evaluate, resolve_device


class CentralEvaluator:
    """Evaluates global weights on the held-out test split (server side)."""

    def __init__(self, cfg: FedimgConfig, dataset: Dataset) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.num_classes = dataset.num_classes
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, num_classes=dataset.num_classes,
                                 weights="none", transfer=cfg.transfer).to(self.device)
        test = dataset.test
        self.loader = InMemoryLoader(
            test.images, test.labels, indices=np.arange(len(test.labels)),
            batch_size=cfg.train.eval_batch_size, shuffle=False, seed=cfg.seed,
            transform=build_transform("none", image_size=cfg.data.image_size, train=False))

    def __call__(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state, strict=True)
        metrics = evaluate(self.model, self.loader, device=self.device,
                           num_classes=self.num_classes, amp=self.cfg.train.amp)
        return {f"test/{k}": v for k, v in metrics.items() if k != "num_examples"}


