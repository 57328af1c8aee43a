"""Transfer-learning regimes: which parameters train, and how BatchNorm behaves.

Three modes (``TransferConfig.mode``), following the usual fine-tuning ladder
(Yosinski et al., "How transferable are features in deep neural networks?",
NeurIPS 2014; Kornblith et al., "Do Better ImageNet Models Transfer Better?",
CVPR 2019):

* ``full``: every parameter trains.
* ``head``: only the new classification head trains (linear probing).
* ``last_k``: the last ``k`` feature blocks of the model's ordered block list
  train, plus everything after them (the head, and e.g. MobileNetV3's hidden
  classifier layer).

Frozen parts must stay frozen even in ``model.train()``, so BatchNorm layers whose
parameters are all frozen become :class:`torchvision.ops.misc.FrozenBatchNorm2d`
with the same statistics (``bn=train``), and the dropout and stochastic-depth layers
inside frozen blocks are switched off (``p = 0``): a frozen block is a fixed feature
extractor, run as in inference (the practice of Keras' transfer-learning guide, "run
the base model in inference mode"). Its output is then a function of the image
alone, which is what lets :mod:`fedimg.training.feature_cache` compute it once. With ``bn=frozen`` every BatchNorm is
replaced: train-mode BatchNorm mixes the samples of a batch, which breaks
per-sample gradients for differential privacy (Opacus), while frozen statistics
keep the pretrained features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import FrozenBatchNorm2d

from fedimg.config import TransferConfig
from fedimg.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

MODES = ("full", "head", "last_k")
BN_MODES = ("train", "frozen")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) numbers of ``nn.Parameter`` elements.

    Buffers are not counted: BatchNorm statistics never count, and the affine
    values of a FrozenBatchNorm2d are buffers, so freezing BatchNorm lowers the total.
    """
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return total, trainable


def apply_transfer(
    model: nn.Module,
    *,
    blocks: list[nn.Module],
    head: nn.Module,
    transfer: TransferConfig | None,
    model_name: str = "model",
) -> nn.Module:
    """Freeze parts of ``model`` in place according to ``transfer`` and return it.

    ``blocks`` is the model's ordered list of feature blocks (input to output) and
    ``head`` its classification layer. ``None`` means full fine-tuning with
    BatchNorm in train mode (the model is returned untouched).
    """
    if transfer is None:
        return model
    _check_transfer(transfer, num_blocks=len(blocks), model_name=model_name)
    set_trainable(model.parameters(), trainable=transfer.mode != "head")
    frozen = blocks if transfer.mode == "head" else []
    if transfer.mode == "last_k":
        frozen = blocks[: len(blocks) - transfer.last_k]
        for block in frozen:
            set_trainable(block.parameters(), trainable=False)
    set_trainable(head.parameters(), trainable=transfer.train_head)
    replaced = freeze_batchnorm(model, only_frozen=transfer.bn == "train")
    silence_random_layers(frozen)
    total, trainable = count_parameters(model)
    logger.info(
        "%s transfer mode=%s last_k=%d bn=%s: %d/%d parameters trainable, "
        "%d BatchNorm layers frozen", model_name, transfer.mode, transfer.last_k,
        transfer.bn, trainable, total, replaced,
    )
    return model


def frozen_state_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys local training never changes: frozen parameters and the
    statistics and affine values of FrozenBatchNorm2d layers."""
    keys = {name for name, p in model.named_parameters() if not p.requires_grad}
    keys |= {f"{name}.{buffer}" if name else buffer
             for name, module in model.named_modules()
             if isinstance(module, FrozenBatchNorm2d)
             for buffer, _ in module.named_buffers(recurse=False)}
    return frozenset(keys)


def batchnorm_state_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the trainable BatchNorm layers: affine weights and statistics.

    These are what FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID
    Features via Local Batch Normalization") keeps local to each client.
    FrozenBatchNorm2d layers are left out: they never change.
    """
    return frozenset(f"{name}.{key}" if name else key
                     for name, module in model.named_modules()
                     if isinstance(module, nn.modules.batchnorm._BatchNorm)
                     for key in module.state_dict())


def silence_random_layers(blocks: Iterable[nn.Module]) -> int:
    """Set ``p = 0`` on every dropout and stochastic-depth layer in ``blocks``; how many."""
    silenced = 0
    for block in blocks:
        for module in block.modules():
            if isinstance(module, (nn.modules.dropout._DropoutNd, StochasticDepth)) \
                    and module.p > 0:
                module.p, silenced = 0.0, silenced + 1
    return silenced


def set_trainable(params: Iterable[nn.Parameter], *, trainable: bool) -> None:
    """Set ``requires_grad`` on every parameter of ``params``."""
    for param in params:
        param.requires_grad_(trainable)


def freeze_batchnorm(model: nn.Module, *, only_frozen: bool = False) -> int:
    """Replace BatchNorm2d layers by FrozenBatchNorm2d in place; return how many.

    With ``only_frozen`` only layers whose parameters are all frozen are replaced
    (BatchNorm inside frozen blocks); otherwise every BatchNorm2d is.
    """
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        and not (only_frozen and any(p.requires_grad for p in module.parameters()))
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, frozen_copy(getattr(parent, child), name=name))
    return len(names)


def frozen_copy(bn: nn.BatchNorm2d, *, name: str = "") -> FrozenBatchNorm2d:
    """FrozenBatchNorm2d with the statistics, affine values and eps of ``bn``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError(
            f"BatchNorm '{name}' has track_running_stats=False, so there are no "
            f"statistics to freeze; fix: use transfer.bn=train with transfer.mode=full"
        )
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen = frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
    with torch.no_grad():
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        if bn.affine:
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
    return frozen


def _check_transfer(transfer: TransferConfig, *, num_blocks: int, model_name: str) -> None:
    if transfer.mode not in MODES:
        raise ConfigError(
            f"transfer.mode='{transfer.mode}' is unknown; valid: {', '.join(MODES)}"
        )
    if transfer.bn not in BN_MODES:
        raise ConfigError(
            f"transfer.bn='{transfer.bn}' is unknown; valid: {', '.join(BN_MODES)}"
        )
    if transfer.mode == "head" and not transfer.train_head:
        raise ConfigError(
            "transfer.mode=head with transfer.train_head=false leaves nothing to train; "
            "fix: transfer.mode=last_k (or full) to train blocks under a fixed head, or "
            "transfer.train_head=true"
        )
    if transfer.mode == "last_k" and not 1 <= transfer.last_k <= num_blocks:
        raise ConfigError(
            f"transfer.last_k={transfer.last_k} is out of range: model={model_name} "
            f"has {num_blocks} feature blocks; valid: 1..{num_blocks}; fix: choose a "
            f"last_k in that range, or transfer.mode=full to train every block"
        )
