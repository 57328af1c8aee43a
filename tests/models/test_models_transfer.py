"""Transfer regimes: trainable counts by hand, BatchNorm freezing, range errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fedimg.config import TransferConfig
from fedimg.errors import ConfigError
from fedimg.models import build_model, count_parameters, freeze_batchnorm, imagenet_model
from fedimg.models.transfer import frozen_copy

# resnet18 layer4: conv 256->512 3x3, conv 512->512 3x3, downsample 1x1 256->512,
# then conv 512->512 3x3 twice; 5 BatchNorms of 512 channels (weight + bias).
RESNET18_LAYER4 = 256 * 512 * 9 + 512 * 512 * 9 + 256 * 512 + 2 * 512 * 512 * 9 + 5 * 2 * 512
assert RESNET18_LAYER4 == 8_393_728


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_none_means_everything_trains() -> None:
    # Act
    total, trainable = count_parameters(build_model("resnet18", num_classes=2, weights="none"))

    # Assert: 11,689,512 ImageNet parameters - 1000-class fc + 2-class fc
    assert total == trainable == 11_689_512 - (512 * 1000 + 1000) + (512 * 2 + 2)


@pytest.mark.parametrize(("name", "in_features"), [("efficientnet_lite0", 1280),
                                                   ("mobilenet_v3_small", 1024),
                                                   ("resnet18", 512)])
def test_head_mode_trains_only_the_new_linear(name: str, in_features: int) -> None:
    # Arrange
    transfer = TransferConfig(mode="head")

    # Act
    model = build_model(name, num_classes=5, weights="none", transfer=transfer)

    # Assert: in_features * num_classes + num_classes; every BatchNorm frozen
    assert count_parameters(model)[1] == in_features * 5 + 5
    assert _count(model, nn.BatchNorm2d) == 0


@pytest.mark.parametrize(("bn", "expected"), [("train", RESNET18_LAYER4 + 1026),
                                              ("frozen", RESNET18_LAYER4 - 5 * 1024 + 1026)])
def test_last_k_1_on_resnet18_trains_layer4_and_head(bn: str, expected: int) -> None:
    # Arrange
    transfer = TransferConfig(mode="last_k", last_k=1, bn=bn)

    # Act
    model = build_model("resnet18", num_classes=2, weights="none", transfer=transfer)

    # Assert: frozen BN affine values become buffers, so they leave the count
    assert count_parameters(model)[1] == expected
    assert all(p.requires_grad for p in model.layer4.parameters())
    assert not any(p.requires_grad for p in model.layer3.parameters())


def test_bn_train_freezes_only_batchnorm_of_frozen_blocks() -> None:
    # Arrange: lite0 has 49 BatchNorms; the last MBConv block has 3, the head conv 1
    transfer = TransferConfig(mode="last_k", last_k=2, bn="train")

    # Act
    model = build_model("efficientnet_lite0", num_classes=2, weights="none", transfer=transfer)

    # Assert
    assert _count(model, nn.BatchNorm2d) == 4
    assert _count(model, FrozenBatchNorm2d) == 45
    assert isinstance(model._blocks[15]._bn2, nn.BatchNorm2d)
    assert isinstance(model._blocks[14]._bn2, FrozenBatchNorm2d)


def test_last_k_out_of_range_says_how_many_blocks() -> None:
    transfer = TransferConfig(mode="last_k", last_k=6)
    with pytest.raises(ConfigError, match="last_k=6.*resnet18 has 5 feature blocks"):
        build_model("resnet18", num_classes=2, weights="none", transfer=transfer)


@pytest.mark.parametrize("field", [{"mode": "probe"}, {"bn": "eval"}])
def test_unknown_transfer_values_are_config_errors(field: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="valid"):
        build_model("resnet18", num_classes=2, weights="none", transfer=TransferConfig(**field))


def test_frozen_bn_keeps_buffers_through_a_train_mode_step() -> None:
    # Arrange
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=3,
                        transfer=TransferConfig(mode="full", bn="frozen")).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    weight = model._blocks[3]._project_conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    # Act
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    # Assert: all 49 BN layers frozen, their buffers untouched, convs trained
    assert _count(model, nn.BatchNorm2d) == 0
    assert _count(model, FrozenBatchNorm2d) == 49
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert not torch.equal(model._blocks[3]._project_conv.weight, weight)


def test_frozen_copy_keeps_eps_and_output() -> None:
    # Arrange: tiny variances make eps matter (1e-3 vs the 1e-5 default)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, eps=1e-3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1e-3, 1e-4, 1.0, 4.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    x = torch.randn(2, 4, 3, 3)

    # Act
    frozen = frozen_copy(bn)

    # Assert
    assert frozen.eps == 1e-3
    torch.testing.assert_close(frozen(x), bn(x))


def test_freezing_pretrained_lite0_keeps_its_eval_outputs() -> None:
    # Arrange
    model = imagenet_model("efficientnet_lite0")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)

    # Act
    replaced = freeze_batchnorm(model)
    with torch.no_grad():
        after = model(x)

    # Assert
    assert replaced == 49
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_frozen_bn_checkpoint_loads_into_a_plain_model(tmp_path: Path) -> None:
    # Arrange: a model trained with bn=frozen saves no num_batches_tracked
    frozen = build_model("efficientnet_lite0", num_classes=2,
                         transfer=TransferConfig(mode="head", bn="frozen"))
    path = tmp_path / "frozen.pth"
    torch.save(frozen.state_dict(), path)

    # Act
    plain = build_model("efficientnet_lite0", num_classes=2, weights=str(path))

    # Assert
    assert _count(plain, nn.BatchNorm2d) == 49
    assert torch.equal(plain._bn1.running_var, frozen._bn1.running_var)
    assert torch.equal(plain._fc.weight, frozen._fc.weight)


def test_frozen_blocks_run_without_stochastic_depth_and_the_rest_keeps_it() -> None:
    # Arrange: Lite0's block list is [stem, 16 MBConv, head conv]; last_k=2 trains the
    # last MBConv (drop-connect p = 0.2 * 15 / 16) and the head conv
    from torchvision.ops import StochasticDepth

    model = build_model("efficientnet_lite0", num_classes=3, weights="none",
                        transfer=TransferConfig(mode="last_k", last_k=2))
    blocks = list(model._blocks)
    p = [float(b._drop_connect.p) for b in blocks]
    # Assert: MBConv 0..14 silenced; the trained MBConv 15 keeps 0.2 * 15/16
    assert p[:15] == [0.0] * 15
    assert p[15] == pytest.approx(0.1875)
    assert model._dropout.p == 0.2  # the head's dropout is not in a frozen block
    # the frozen trunk in train mode is a function of the image alone
    model.train()
    x = torch.randn(4, 3, 32, 32)
    trunk = nn.Sequential(model._stem_pad, model._conv_stem, model._bn0, *blocks[:15])
    assert torch.equal(trunk(x), trunk(x))
    assert sum(isinstance(m, StochasticDepth) and m.p > 0 for m in model.modules()) == 1


def test_head_mode_silences_every_block() -> None:
    model = build_model("efficientnet_lite0", num_classes=3, weights="none",
                        transfer=TransferConfig(mode="head", bn="frozen"))
    assert all(float(b._drop_connect.p) == 0.0 for b in model._blocks)
    assert model._dropout.p == 0.2
