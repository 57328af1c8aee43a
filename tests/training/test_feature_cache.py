"""The frozen-trunk feature cache: model splits, exactness, keys, memory bound, view banks."""

from __future__ import annotations

import dataclasses
import logging
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from fedimg.config import FeatureCache, FedimgConfig, TransferConfig, TransferMode, validate
from fedimg.config.choices import Augment
from fedimg.data import InMemoryLoader, build_transform
from fedimg.errors import ConfigError
from fedimg.models import build_model, count_parameters
from fedimg.models.split import SplitRefused, split_model
from fedimg.training import train_local
from fedimg.training import feature_cache as fc
from fedimg.training.feature_cache import TrunkCache, plan_cache

CPU = torch.device("cpu")
SIZE = 32  # px: small, and every zoo model still has a 1x1 map at its end
PROBE = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
LOG = "fedimg.training.feature_cache"


def _cfg(model: str = "resnet18", mode: str = "head", *, augment: str = "none",
         cache: str = "on", gb: float = 1.0, views: int = 3) -> FedimgConfig:
    base = FedimgConfig()
    return validate(dataclasses.replace(
        base, model=model, seed=3,
        data=dataclasses.replace(base.data, image_size=SIZE, augment=Augment(augment)),
        transfer=TransferConfig(mode=TransferMode(mode), last_k=2, bn="frozen"),
        train=dataclasses.replace(base.train, batch_size=8, eval_batch_size=16, local_steps=5,
                                  lr=0.05, feature_cache=FeatureCache(cache),
                                  feature_cache_gb=gb, feature_cache_views=views)))


def _model(cfg: FedimgConfig, weights: str = "none") -> nn.Module:
    """Random init, or ImageNet weights (EfficientNet-Lite0's are bundled): at random init
    its and MobileNet's frozen BatchNorm make features of about 1e-9, too weak a test."""
    torch.manual_seed(0)
    return build_model(cfg.model, num_classes=3, weights=weights, transfer=cfg.transfer)


def _loader(cfg: FedimgConfig, *, n: int = 20, train: bool = True) -> InMemoryLoader:
    """``n`` random uint8 images (3, 36, 36) among 30, every third one skipped."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (30, 3, 36, 36), dtype=torch.uint8, generator=g)
    labels = torch.arange(30) % 3
    transform = build_transform(cfg.data.augment, image_size=SIZE, train=train)
    return InMemoryLoader(images, labels, indices=np.arange(30)[np.arange(30) % 3 != 2][:n],
                          batch_size=cfg.train.batch_size if train else cfg.train.eval_batch_size,
                          transform=transform, shuffle=train, seed=7)


# --- splitting ------------------------------------------------------------------------

Split = namedtuple("Split", "model mode boundary shape exact")
SPLITS = [
    Split("resnet18", "head", "flatten", (512,), True),
    # last_k=2 trains layer3+4: 32 px -> conv1 16 -> maxpool 8 -> layer2 4
    Split("resnet18", "last_k", "layer2_1_relu_1", (128, 4, 4), True),
    Split("mobilenet_v3_small", "head", "classifier_1", (1024,), True),  # dropout joins the tail
    # frozen blocks run without stochastic depth (fedimg.models.transfer): exact
    Split("efficientnet_lite0", "head", "flatten", (1280,), True),
    Split("efficientnet_lite0", "last_k", "add_8", (192, 1, 1), True),
    # DenseNet's concatenations read two trunk values; the cut moves back to their source
    Split("densenet121", "last_k", "features_transition2_pool", (256, 2, 2), True),
    Split("efficientnet_b0", "head", "flatten", (1280,), True),
    Split("resnet50", "head", "flatten", (2048,), True),
    Split("mobilenet_v3_large", "last_k", "iadd_8", (160, 1, 1), True),
]


@pytest.mark.parametrize("case", SPLITS, ids=lambda c: f"{c.model}-{c.mode}")
def test_every_zoo_model_splits_into_a_frozen_trunk_and_its_trainable_tail(case) -> None:
    # Arrange
    model = _model(_cfg(case.model, case.mode))
    _, trainable = count_parameters(model)
    # Act
    split = split_model(model, probe=PROBE)
    # Assert: the trunk owns no trainable weight, the tail owns all of them, and the
    # two reproduce the model (split_model checks that itself)
    assert (split.boundary, split.exact) == (case.boundary, case.exact)
    assert not any(p.requires_grad for p in split.trunk.parameters())
    assert sum(p.numel() for p in split.tail.parameters() if p.requires_grad) == trainable
    with torch.no_grad():
        assert tuple(split.trunk.eval()(PROBE).shape[1:]) == case.shape
    assert split.trunk_state()  # frozen weights and buffers to hash


def test_a_live_random_layer_in_the_trunk_is_named_and_full_fine_tuning_is_refused() -> None:
    # Arrange: Lite0 head-only, with the stochastic depth transfer switched off put back
    # into blocks 2..10 (a custom model that keeps random layers in its frozen part)
    model = _model(_cfg("efficientnet_lite0"))
    for block in list(model._blocks)[2:11]:
        block._drop_connect.p = 0.1
    split = split_model(model, probe=PROBE)
    # only blocks that keep their shape call drop-connect (on the residual branch)
    assert split.stochastic == tuple(f"_blocks.{i}._drop_connect" for i in (2, 4, 6, 7, 9, 10))
    assert not split.exact
    with pytest.raises(SplitRefused, match="transfer.mode=head or last_k"):
        split_model(_model(_cfg("resnet18", "full", cache="auto")), probe=PROBE)


# --- what each mode does --------------------------------------------------------------


@pytest.mark.parametrize("cache, augment, model, train, views", [
    ("auto", "none", "resnet18", True, 1),  # exact: trains from the cache
    ("auto", "light", "resnet18", True, 3),  # augmenting: from a bank of 3 views
    ("auto", "none", "efficientnet_lite0", True, 1),  # frozen blocks: no stochastic depth
    ("on", "light", "efficientnet_lite0", True, 3),
    ("on", "none", "resnet18", True, 1),
])
def test_auto_trains_from_the_cache_where_the_trunk_is_a_function_of_the_image(
        cache, augment, model, train, views) -> None:
    cfg = _cfg(model, augment=augment, cache=cache)
    plan = plan_cache(cfg, split_model(_model(cfg), probe=PROBE))
    assert (plan.train, plan.evaluate, plan.views) == (train, True, views)


def test_off_or_zero_gib_or_a_refused_split_caches_nothing() -> None:
    split = split_model(_model(_cfg()), probe=PROBE)
    assert plan_cache(_cfg(cache="off"), split).reason == "train.feature_cache=off"
    assert plan_cache(_cfg(cache="auto", gb=0), split).reason == "train.feature_cache_gb=0"
    refused = plan_cache(_cfg(cache="auto"), None, "no trunk")
    assert (refused.train, refused.evaluate, refused.reason) == (False, False, "no trunk")


@pytest.mark.parametrize("change, message", [
    ({"feature_cache_gb": -1.0}, "train.feature_cache_gb=-1.0 is impossible"),
    ({"feature_cache_gb": float("inf")}, "valid: >= 0"),
    ({"feature_cache_views": 0}, "train.feature_cache_views=0 is out of range"),
    ({"feature_cache_views": 65}, "valid: 1..64"),
    ({"feature_cache_gb": 0.0}, "train.feature_cache=on with train.feature_cache_gb=0"),
])
def test_config_checks_name_the_value_the_range_and_the_fix(change, message) -> None:
    cfg = _cfg()
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **change))
    with pytest.raises(ConfigError, match=message) as info:
        validate(bad)
    assert "Fix:" in str(info.value)


def test_on_with_full_fine_tuning_is_refused_while_building() -> None:
    cfg = _cfg(cache="auto")
    with pytest.raises(ConfigError, match="no frozen trunk to cache; valid: transfer.mode"):
        validate(dataclasses.replace(cfg, transfer=TransferConfig(mode="full"),
                                     train=dataclasses.replace(cfg.train, feature_cache="on")))


# --- exactness ------------------------------------------------------------------------


@pytest.mark.parametrize("model, mode", [("resnet18", "head"), ("resnet18", "last_k"),
                                         ("efficientnet_lite0", "head"),
                                         ("efficientnet_lite0", "last_k")])
def test_cached_training_gives_the_uncached_weights_and_losses(model, mode) -> None:
    # Arrange: two identical models and loaders, augment=none (Lite0's frozen blocks run
    # without stochastic depth; its trained last block keeps it, in the tail)
    cfg = _cfg(model, mode)
    weights = "pretrained" if model == "efficientnet_lite0" else "none"
    plain, cached_model = (_model(cfg, weights) for _ in range(2))
    loader = _loader(cfg)
    tail, features = TrunkCache.build(cached_model, cfg=cfg, device=CPU).train_inputs(
        0, loader, amp=False)
    # Act: the same seeded round (2 epochs of 3 batches), on images and on features
    results = []
    for net, data in ((plain, loader), (tail, features)):
        torch.manual_seed(5)
        data.epoch = 0
        results.append(train_local(net, data, cfg=cfg.train, lr=0.05, device=CPU))
    expected, got = results
    # Assert: the same 5 steps (batches of 8, 8, 4, then 8, 8: 36 samples), per-step
    # losses and trained weights (frozen ones untouched)
    assert (got.steps, got.num_examples) == (expected.steps, expected.num_examples) == (5, 36)
    assert got.loss == pytest.approx(expected.loss, rel=1e-5)
    assert got.last_loss == pytest.approx(expected.last_loss, rel=1e-5)
    for (name, a), b in zip(plain.state_dict().items(), cached_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_the_feature_loader_batches_the_same_rows_in_the_same_order() -> None:
    cfg = _cfg()
    loader = _loader(cfg)
    loader.epoch = 4
    _, features = TrunkCache.build(_model(cfg), cfg=cfg, device=CPU).train_inputs(
        0, loader, amp=False)
    got = [y for _, y in features]
    loader.epoch = 4
    assert [torch.equal(a, y) for a, (_, y) in zip(got, loader)] == [True, True, True]
    assert features.epoch == 5 and len(features) == len(loader) == 3  # 20 rows, batch 8


# --- the key --------------------------------------------------------------------------


def test_a_changed_frozen_weight_or_image_is_a_new_key_and_a_rebuild(caplog) -> None:
    # Arrange: features built once
    cfg = _cfg()
    model, loader = _model(cfg), _loader(cfg)
    cache = TrunkCache.build(model, cfg=cfg, device=CPU)
    first = cache.key(loader, train=True, amp=False, client=0)
    cache.train_inputs(0, loader, amp=False)
    cache.train_inputs(0, loader, amp=False)  # unchanged: served from the store
    assert cache.builds == 1
    caplog.set_level(logging.INFO, logger=LOG)
    # Act 1: one frozen weight moves by one float32 ulp
    with torch.no_grad():
        w = model.conv1.weight
        w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(1.0))
    cache.train_inputs(0, loader, amp=False)
    moved = cache.key(loader, train=True, amp=False, client=0)
    # Act 2: one pixel of one of the client's images
    loader.images[int(loader.indices[3]), 0, 0, 0] ^= 1
    cache.train_inputs(0, loader, amp=False)
    edited = cache.key(loader, train=True, amp=False, client=0)
    # Assert: each change gives a new digest of its own part, and a rebuild that says why
    assert moved.weights != first.weights and moved.images == first.images
    assert edited.images != moved.images and edited.weights == moved.weights
    assert len({first.digest, moved.digest, edited.digest}) == 3
    assert cache.builds == 3
    assert "built (frozen trunk weights changed)" in caplog.text
    assert "built (images changed)" in caplog.text


def test_an_image_outside_the_clients_rows_or_a_tail_weight_changes_nothing() -> None:
    cfg = _cfg()
    model, loader = _model(cfg), _loader(cfg)
    cache = TrunkCache.build(model, cfg=cfg, device=CPU)
    before = cache.key(loader, train=True, amp=False, client=0)
    loader.images[2] ^= 255  # index 2 is not one of this client's rows
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # the tail trains: not part of the key
    assert cache.key(loader, train=True, amp=False, client=0) == before


# --- memory bound ---------------------------------------------------------------------


def test_beyond_the_budget_features_spill_to_a_memory_mapped_file(tmp_path, caplog) -> None:
    # Arrange: 20 images x 512 floats = 40 KiB, against a 1 KiB budget
    cfg = _cfg(gb=2 ** -20)
    model, loader = _model(cfg), _loader(cfg)
    in_ram = TrunkCache.build(model, cfg=_cfg(), device=CPU).train_inputs(0, loader, amp=False)
    cache = TrunkCache.build(model, cfg=cfg, device=CPU, spill_dir=tmp_path)
    caplog.set_level(logging.INFO, logger=LOG)
    # Act
    _, spilled = cache.train_inputs(0, loader, amp=False)
    # Assert: the same features, from a file-backed mapping (already unlinked)
    assert "spilled to a memory-mapped file in" in caplog.text and str(tmp_path) in caplog.text
    assert torch.equal(spilled.images, in_ram[1].images) and spilled.images.shape == (20, 512)
    assert cache.store.ram_bytes == 0 and list((tmp_path / "fedimg-feature-cache").iterdir()) == []


def test_without_disk_room_either_the_client_trains_uncached(tmp_path, caplog,
                                                             monkeypatch) -> None:
    cfg = _cfg(gb=2 ** -20)
    cache = TrunkCache.build(_model(cfg), cfg=cfg, device=CPU, spill_dir=tmp_path)
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda _: namedtuple("U", "free")(1024))
    caplog.set_level(logging.INFO, logger=LOG)
    assert cache.train_inputs(0, _loader(cfg), amp=False) is None
    assert "cannot spill" in caplog.text and "training it uncached" in caplog.text
    assert "only 0.00 GiB free" in caplog.text


# --- a bank of augmented views --------------------------------------------------------


def test_a_view_bank_holds_k_seeded_views_and_each_step_draws_one_per_sample() -> None:
    # Arrange: augment=light, 3 views per image
    cfg = _cfg(augment="light")
    model, loader = _model(cfg), _loader(cfg)
    torch.manual_seed(11)
    _, a = TrunkCache.build(model, cfg=cfg, device=CPU).train_inputs(0, loader, amp=False)
    _, b = TrunkCache.build(model, cfg=cfg, device=CPU).train_inputs(0, loader, amp=False)
    after = torch.rand(1)
    # Assert: (20, 3, 512), the same bank from the same (run, client) seed, three
    # different views of every image, and the global RNG left as it was
    assert a.images.shape == (20, 3, 512) and torch.equal(a.images, b.images)
    assert not torch.equal(a.images[:, 0], a.images[:, 1])
    torch.manual_seed(11)
    assert torch.equal(torch.rand(1), after)
    # each draw picks one view per sample from the global RNG, seeded by the caller
    draws = []
    for _ in range(2):
        torch.manual_seed(2)
        a.epoch = 0
        draws.append(next(iter(a))[0])
    x1, x2 = draws
    assert x1.shape == (8, 512) and torch.equal(x1, x2)
    bank = a.images[torch.from_numpy(np.random.default_rng([7, 0]).permutation(20)[:8])]
    assert all(any(torch.equal(x, v) for v in views) for x, views in zip(x1, bank))
