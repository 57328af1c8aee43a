"""The model zoo: every family builds; weights come from the cache, a file or a clear error."""

from __future__ import annotations

import socket
import time
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torch.hub
import torchvision

from fedimg.errors import ConfigError, ModelError
from fedimg.models import MODELS, build_model, imagenet_model, list_models

FAMILIES = ["densenet121", "efficientnet_b0", "efficientnet_lite0", "mobilenet_v3_large",
            "mobilenet_v3_small", "resnet18", "resnet50"]
HEAD_IN_FEATURES = {"densenet121": 1024, "efficientnet_b0": 1280, "efficientnet_lite0": 1280,
                    "mobilenet_v3_large": 1280, "mobilenet_v3_small": 1024,
                    "resnet18": 512, "resnet50": 2048}
NUM_BLOCKS = {"densenet121": 5, "efficientnet_b0": 9, "efficientnet_lite0": 18,
              "mobilenet_v3_large": 17, "mobilenet_v3_small": 13, "resnet18": 5, "resnet50": 5}


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def _cache_file(torch_home: Path, name: str) -> Path:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return torch_home / "hub" / "checkpoints" / Path(urlparse(url).path).name


def test_registry_lists_every_family() -> None:
    # Act / Assert
    assert list_models() == FAMILIES
    assert all(MODELS.get(name).name == name for name in FAMILIES)


def test_unknown_model_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet19'.*efficientnet_lite0"):
        build_model("resnet19", num_classes=2, weights="none")


@pytest.mark.parametrize("name", FAMILIES)
def test_family_builds_from_scratch_and_forwards_small_inputs(name: str) -> None:
    # Arrange
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, weights="none").train()
    spec = MODELS.get(name)

    # Act
    out32 = model(torch.randn(2, 3, 32, 32))
    out28 = model(torch.randn(2, 3, 28, 28))

    # Assert: a fresh head and the documented number of feature blocks
    head = spec.get_head(model)
    assert (head.in_features, head.out_features) == (HEAD_IN_FEATURES[name], 7)
    assert len(spec.blocks(model)) == NUM_BLOCKS[name]
    assert out32.shape == (2, 7) and out28.shape == (2, 7)


@pytest.mark.parametrize("name", FAMILIES)
def test_inplace_free_flag_is_truthful(name: str) -> None:
    # Arrange: full backward hooks (as used for per-sample gradients) break on in-place ops
    model = build_model(name, num_classes=2, weights="none").train()
    for module in model.modules():
        if list(module.parameters(recurse=False)):
            module.register_full_backward_hook(lambda *_: None)

    # Act
    try:
        model(torch.randn(2, 3, 32, 32, requires_grad=True)).sum().backward()
        hooks_work = True
    except RuntimeError:
        hooks_work = False

    # Assert
    assert hooks_work == MODELS.get(name).inplace_free


def test_offline_uncached_pretrained_fails_fast_naming_the_file(
    empty_torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: no network, whatever the machine has
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    expected = _cache_file(empty_torch_home, "resnet18")

    # Act
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        build_model("resnet18", num_classes=2, weights="pretrained")
    elapsed = time.perf_counter() - start

    # Assert
    message = str(info.value)
    assert elapsed < 5.0
    assert str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "model=efficientnet_lite0" in message and "weights=none" in message


def test_hanging_download_is_cut_by_a_socket_timeout(
    empty_torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a server that never answers; record the timeout in force
    seen: list[float | None] = []

    def hang(*args: object, **kwargs: object) -> None:
        seen.append(socket.getdefaulttimeout())
        raise socket.timeout("timed out")

    monkeypatch.setattr(torch.hub, "urlopen", hang)
    before = socket.getdefaulttimeout()

    # Act
    with pytest.raises(ModelError, match="could not be downloaded"):
        imagenet_model("mobilenet_v3_small")

    # Assert: a finite timeout during the attempt, the old one restored after
    assert seen == [10.0]
    assert socket.getdefaulttimeout() == before


def test_pretrained_loads_from_the_hub_cache(empty_torch_home: Path) -> None:
    # Arrange: a "checkpoint" made from a random model, under torchvision's file name
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    cache = _cache_file(empty_torch_home, "resnet18")
    cache.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cache)

    # Act
    model = build_model("resnet18", num_classes=3, weights="pretrained")

    # Assert: backbone from the cache, head fresh with 3 outputs
    assert torch.equal(model.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, reference.bn1.running_var)
    assert model.fc.weight.shape == (3, 512)


def test_corrupt_cached_checkpoint_says_delete_it(empty_torch_home: Path) -> None:
    # Arrange
    cache = _cache_file(empty_torch_home, "resnet18")
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a checkpoint")

    # Act / Assert
    with pytest.raises(ModelError, match=f"{cache.name} is corrupt.*delete it"):
        imagenet_model("resnet18")


def test_state_dict_round_trips_through_a_weights_path(tmp_path: Path) -> None:
    # Arrange
    torch.manual_seed(0)
    saved = build_model("mobilenet_v3_small", num_classes=4, weights="none")
    path = tmp_path / "task.pth"
    torch.save(saved.state_dict(), path)

    # Act
    torch.manual_seed(123)
    loaded = build_model("mobilenet_v3_small", num_classes=4, weights=str(path))

    # Assert
    expected, actual = saved.state_dict(), loaded.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def test_weights_path_with_other_head_size_is_a_model_error(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "two_classes.pth"
    torch.save(build_model("resnet18", num_classes=2, weights="none").state_dict(), path)

    # Act / Assert
    with pytest.raises(ModelError, match=r"fc.weight \(2, 512\) vs \(5, 512\)"):
        build_model("resnet18", num_classes=5, weights=str(path))


def test_fedimg_checkpoint_of_another_model_names_what_it_holds(tmp_path: Path) -> None:
    # A run's checkpoints/final.pt: {"state_dict", "meta"} with the model and classes.
    path = tmp_path / "final.pt"
    state = build_model("resnet18", num_classes=3, weights="none").state_dict()
    torch.save({"state_dict": state, "meta": {"model": "resnet18",
                                              "classes": ["a", "b", "c"]}}, path)
    with pytest.raises(ModelError, match=r"checkpoint of model=resnet18 with 3 classes "
                                         r"\['a', 'b', 'c'\].*missing keys"):
        build_model("mobilenet_v3_small", num_classes=3, weights=str(path))
    with pytest.raises(ModelError, match=r"with 3 classes.*fc.weight \(3, 512\) vs \(2, 512\)"):
        build_model("resnet18", num_classes=2, weights=str(path))


def test_missing_weights_file_lists_the_choices(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="'pretrained'.*'none'.*path"):
        build_model("efficientnet_lite0", num_classes=2, weights=str(missing))


@pytest.mark.parametrize("num_classes", [0, -3, 2.5])
def test_impossible_num_classes_is_a_config_error(num_classes: object) -> None:
    with pytest.raises(ConfigError, match=f"num_classes={num_classes}"):
        build_model("efficientnet_lite0", num_classes=num_classes,  # type: ignore[arg-type]
                    weights="none")
