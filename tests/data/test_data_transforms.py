"""Batch transforms (normalisation numbers, per-sample augmentation) and the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.data import AUGMENTATIONS, InMemoryLoader, build_transform
from fedimg.data.transforms import AugmentPreset, BatchTransform
from fedimg.errors import ConfigError


def test_eval_transform_normalises_with_imagenet_numbers() -> None:
    # Arrange: one black and one white greyscale image
    images = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 255.0)]).to(torch.uint8)
    # Act
    out = build_transform("light", image_size=8, train=False)(images)
    # Assert: (0 - 0.485) / 0.229 = -2.1179 ; (1 - 0.406) / 0.225 = 2.64
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx(-2.1179, abs=1e-4)
    assert out[1, 2, 0, 0].item() == pytest.approx(2.64, abs=1e-4)


def test_transform_resizes_to_image_size_and_keeps_batch() -> None:
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    for train in (False, True):
        out = build_transform("strong", image_size=48, train=train)(images)
        assert tuple(out.shape) == (5, 3, 48, 48)
        assert torch.isfinite(out).all()


def test_preset_none_in_training_equals_evaluation() -> None:
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    train = build_transform("none", image_size=16, train=True)(images)
    evaluation = build_transform("none", image_size=16, train=False)(images)
    assert torch.equal(train, evaluation)


def test_augmentation_draws_parameters_per_sample_from_the_torch_rng() -> None:
    # Arrange: 16 copies of one image
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).repeat(16, 1, 1, 1)
    transform = build_transform("light", image_size=32, train=True)
    # Act
    torch.manual_seed(0)
    first = transform(images)
    torch.manual_seed(0)
    again = transform(images)
    # Assert
    assert torch.equal(first, again)
    distinct = {tuple(first[i].flatten()[:64].tolist()) for i in range(16)}
    assert len(distinct) == 16


def test_flip_only_preset_gives_originals_and_mirrors() -> None:
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8).repeat(32, 1, 1, 1)
    plain = BatchTransform(AugmentPreset(), image_size=8, train=False)(images[:1])[0]
    flip = BatchTransform(AugmentPreset(hflip=True), image_size=8, train=True)
    torch.manual_seed(1)
    out = flip(images)
    same = [torch.allclose(o, plain, atol=1e-5) for o in out]
    mirrored = [torch.allclose(o, plain.flip(-1), atol=1e-5) for o in out]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(same) < 32


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="none, light, strong|light, none, strong"):
        build_transform("heavy", image_size=8, train=True)
    assert AUGMENTATIONS.names() == ["light", "none", "strong"]


def make_loader(**kwargs) -> InMemoryLoader:
    """10 images whose label equals their index, so batches reveal coverage."""
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10)
    args = dict(indices=np.arange(10), batch_size=4, transform=None, shuffle=True, seed=0)
    return InMemoryLoader(images, labels, **{**args, **kwargs})


def test_loader_batch_count_shapes_and_coverage() -> None:
    loader = make_loader()
    batches = list(loader)
    assert len(loader) == 3 and loader.num_examples == 10
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (4, 3, 8, 8) and y.dtype == torch.int64
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(10))


def test_loader_epochs_differ_but_are_seeded() -> None:
    a, b = make_loader(seed=3), make_loader(seed=3)
    epoch1 = torch.cat([y for _, y in a]).tolist()
    epoch2 = torch.cat([y for _, y in a]).tolist()
    assert epoch1 == torch.cat([y for _, y in b]).tolist()
    assert epoch1 != epoch2 and sorted(epoch2) == list(range(10))


def test_loader_drop_last_and_subset_indices() -> None:
    assert len(make_loader(drop_last=True)) == 2
    loader = make_loader(indices=np.array([7, 2, 5]), shuffle=False)
    assert torch.cat([y for _, y in loader]).tolist() == [7, 2, 5]
    with pytest.raises(ConfigError, match="indices span"):
        make_loader(indices=np.array([0, 10]))


def test_loader_never_yields_a_single_sample_batch() -> None:
    # 9 samples in batches of 4 would end with a batch of 1, which BatchNorm cannot
    # normalise in train mode: it joins the previous batch instead (4 + 5).
    loader = make_loader(indices=np.arange(9))
    assert len(loader) == 2
    assert [len(y) for _, y in loader] == [4, 5]
    assert [len(y) for _, y in make_loader(indices=np.arange(1))] == [1]
