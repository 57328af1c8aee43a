"""Batch transforms: uint8 (B, C, S, S) -> normalised float32 (B, 3, S, S).

Greyscale is repeated to 3 channels and ImageNet mean/std applied, as the
pretrained CNNs expect. With ``train=True`` the augmentation preset
(``data.augment``) runs with independent random parameters per sample: random
resized crop, horizontal flip and rotation are folded into one affine matrix per
sample and applied with a single :func:`torch.nn.functional.grid_sample` for the
whole batch, and colour jitter is vectorised. (``torchvision.transforms.v2``
applied to a batch draws one set of parameters for all samples, and a per-sample
loop over it costs about 10x more; its semantics are followed here: crop area
and log-uniform aspect ratio, zero fill, jitter factors uniform in [1-x, 1+x].)
Randomness comes from the global torch RNG, which the caller seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedimg.errors import ConfigError
from fedimg.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentPreset:
    """Per-sample augmentation parameters (all off by default)."""

    crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction of the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range (log-uniform)
    hflip: bool = False  # flip with probability 0.5
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    brightness: float = 0.0  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0

    @property
    def geometric(self) -> bool:
        """Whether any geometric augmentation is on."""
        return self.crop_scale != (1.0, 1.0) or self.hflip or self.rotation > 0

    @property
    def photometric(self) -> bool:
        """Whether any colour jitter is on."""
        return max(self.brightness, self.contrast, self.saturation) > 0


AUGMENTATIONS: Registry[AugmentPreset] = Registry("augmentation preset",
                                                  config_key="data.augment")
AUGMENTATIONS.add("none", AugmentPreset())
AUGMENTATIONS.add("light", AugmentPreset(crop_scale=(0.8, 1.0), hflip=True, rotation=10.0))
AUGMENTATIONS.add("strong", AugmentPreset(crop_scale=(0.5, 1.0), hflip=True, rotation=20.0,
                                          brightness=0.3, contrast=0.3, saturation=0.3))


def _affine(batch: int, preset: AugmentPreset, device: torch.device) -> torch.Tensor:
    """(B, 2, 3) matrices mapping output to input coordinates, one random draw per sample."""
    w, h = torch.ones(batch, device=device), torch.ones(batch, device=device)
    cx, cy = torch.zeros(batch, device=device), torch.zeros(batch, device=device)
    if preset.crop_scale != (1.0, 1.0):  # random resized crop, in units of the full image
        lo, hi = preset.crop_scale
        area = lo + (hi - lo) * torch.rand(batch, device=device)
        log_r = math.log(preset.crop_ratio[0]), math.log(preset.crop_ratio[1])
        ratio = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(batch, device=device))
        w, h = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - w) * (2 * torch.rand(batch, device=device) - 1)
        cy = (1 - h) * (2 * torch.rand(batch, device=device) - 1)
    if preset.hflip:
        w = w * torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0)
    angle = math.radians(preset.rotation) * (2 * torch.rand(batch, device=device) - 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * w, -sin * h, cx], dim=1),
                         torch.stack([sin * w, cos * h, cy], dim=1)], dim=1)
    return theta


def _jitter(x: torch.Tensor, preset: AugmentPreset) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation on RGB in [0, 1]."""
    def factor(strength: float) -> torch.Tensor:
        return 1 + strength * (2 * torch.rand(x.shape[0], 1, 1, 1, device=x.device) - 1)

    luma = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
    if preset.brightness > 0:
        x = (x * factor(preset.brightness)).clamp_(0, 1)
    if preset.contrast > 0:
        mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = torch.lerp(mean, x, factor(preset.contrast)).clamp_(0, 1)
    if preset.saturation > 0:
        grey = (x * luma).sum(1, keepdim=True)
        x = torch.lerp(grey, x, factor(preset.saturation)).clamp_(0, 1)
    return x


class BatchTransform:
    """Callable uint8 (B, C, H, W) -> float32 (B, 3, S, S); see the module doc."""

    def __init__(self, preset: AugmentPreset, *, image_size: int, train: bool) -> None:
        self.preset = preset
        self.image_size = image_size
        self.train = train
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"transform expects uint8 (B, 1|3, H, W); got {images.dtype} "
                              f"{tuple(images.shape)}")
        x = images.float().div_(255)
        size = self.image_size
        if self.train and self.preset.geometric:
            theta = _affine(x.shape[0], self.preset, x.device)
            grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        elif x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if self.train and self.preset.photometric:
            x = _jitter(x, self.preset)
        mean, std = self._mean.to(x.device), self._std.to(x.device)
        return ((x - mean) / std).contiguous()

    def __repr__(self) -> str:
        return f"BatchTransform({self.preset}, image_size={self.image_size}, train={self.train})"


def build_transform(preset: str, *, image_size: int, train: bool
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch transform for ``data.augment=preset`` (augmentation only if ``train``)."""
    return BatchTransform(AUGMENTATIONS.get(preset), image_size=image_size, train=train)
