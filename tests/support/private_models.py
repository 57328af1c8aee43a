"""Zoo models as DP-SGD trains them, for per-sample gradient and norm tests.

Full fine-tuning with frozen BatchNorm, rewritten without in-place operations, in
float64, dropout layers made deterministic. The BatchNorm statistics come from one
batch of real activations (as pretrained ones would): with the initial ones (mean 0,
variance 1) most gradients of the random EfficientNets and MobileNets are below 1e-10
and any tolerance passes. float64: in float32, a batch of 3 and a single image round
differently, which can move an activation across a ReLU kink and change a gradient by up
to 1% of its tensor's largest entry; in float64 two methods agree to ~1e-14.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from fedimg.config import TransferConfig
from fedimg.models import MODELS, apply_transfer, build_model, make_inplace_free


# The zoo's largest models: each check on them takes 10-40 s on 2 CPU cores. They run
# with the slow tests (FEDIMG_SLOW=1, as CI does); the others run every time.
HEAVY_MODELS = frozenset({"resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_large"})


def zoo_params(cases: Iterable) -> list:
    """``cases`` (model names, or tuples starting with one) for ``parametrize``, the
    heavy models' marked ``slow``."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
            if (c[0] if isinstance(c, tuple) else c) in HEAVY_MODELS else c for c in cases]


def private_model(name: str) -> nn.Module:
    """Zoo model ``name`` (3 classes, seed 0) prepared as described above."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, weights="none").train()
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        norm.momentum = None  # cumulative average: the statistics of the one batch below
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    spec = MODELS.get(name)
    model = apply_transfer(model, blocks=spec.blocks(model), head=spec.get_head(model),
                           transfer=TransferConfig(mode="full", bn="frozen"))
    model = make_inplace_free(model).double().train()
    for module in model.modules():
        if isinstance(module, (nn.Dropout, StochasticDepth)):
            module.eval()  # no parameters, so Opacus does not care; same masks for all
    return model
