"""Dataset sources: real loaders on shared data, corrupt files, fallback and synthetic."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedimg.config import DataConfig, SyntheticConfig
from fedimg.data import DATASETS, load_dataset, partition_dataset, resolve_data_root
from fedimg.data.decode import resize_batch
from fedimg.errors import ConfigError, DataError


def cfg_for(name: str, root: Path, **kwargs) -> DataConfig:
    return DataConfig(dataset=name, root=str(root), download=False, **kwargs)


@pytest.fixture(scope="module")
def gtsrb(shared_data: Path):
    return load_dataset(cfg_for("gtsrb", shared_data, image_size=32), seed=0)


def test_pneumoniamnist_real_shapes_and_md5_warning(shared_data: Path) -> None:
    # Act
    ds = load_dataset(cfg_for("pneumoniamnist", shared_data, image_size=28), seed=0)
    # Assert
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3882, 524, 624)
    assert ds.channels == 1 and ds.classes == ("normal", "pneumonia")
    assert tuple(ds.train.images.shape) == (3882, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.provenance.source == "real"
    assert any("28209eda62fecd6e6a2d98b1501bb15f" in w for w in ds.provenance.warnings)


def test_retinamnist_has_5_classes_3_channels_and_official_md5(shared_data: Path) -> None:
    ds = load_dataset(cfg_for("retinamnist", shared_data, image_size=64), seed=0)
    assert ds.num_classes == 5 and ds.channels == 3
    assert tuple(ds.test.images.shape) == (400, 3, 64, 64)
    assert ds.provenance.warnings == ()


def test_bccd_cells_classes_sizes_and_aligned_metadata(shared_data: Path) -> None:
    ds = load_dataset(cfg_for("bccd_cells", shared_data, image_size=32), seed=0)
    assert ds.classes == ("Platelets", "RBC", "WBC")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1014, 419, 347)
    # metadata.csv's label column must match the class folder of every image
    names = np.array(ds.classes)[ds.train.labels.numpy()]
    assert np.array_equal(names, ds.train.metadata["label"])
    assert "source_image" in ds.train.metadata


def test_gtsrb_has_43_classes_and_global_track_ids(gtsrb) -> None:
    assert gtsrb.num_classes == 43 and gtsrb.classes[14] == "Stop and give way"
    assert (len(gtsrb.train), len(gtsrb.test)) == (2580, 1720)
    class_ids = gtsrb.train.metadata["class_id"].astype(int)
    assert np.array_equal(class_ids, gtsrb.train.labels.numpy())
    # 43 classes x 2 tracks numbered per class -> 86 physical signs
    assert len(np.unique(gtsrb.train.metadata["track"])) == 86
    assert set(gtsrb.train.metadata["track_in_class"]) == {"00000", "00001"}


def test_natural_partition_on_gtsrb_track_shares_no_track(gtsrb) -> None:
    cfg = DataConfig(partitioner="natural", natural_column="track", min_partition_size=10)
    parts = partition_dataset(gtsrb.train, cfg=cfg, num_clients=10, seed=0)
    tracks = gtsrb.train.metadata["track"]
    per_client = [set(tracks[np.concatenate([p.train_indices, p.val_indices])]) for p in parts]
    assert sum(len(t) for t in per_client) == 86
    assert len(set().union(*per_client)) == 86


def test_max_train_samples_keeps_class_shares(tmp_path: Path) -> None:
    synth = SyntheticConfig(num_classes=4, train_size=400, test_size=40, image_size=16)
    cfg = DataConfig(dataset="synthetic", synthetic=synth, max_train_samples=100,
                     max_test_samples=20, image_size=16)
    ds = load_dataset(cfg, seed=0)
    assert np.bincount(ds.train.labels.numpy()).tolist() == [25, 25, 25, 25]
    assert len(ds.test) == 20


def _write_folder(root: Path, mode: str = "RGB") -> Path:
    """A 3-image cifar10_subset folder: train cat (10), train dog (200), test dog (120)."""
    base = root / "cifar10_subset"
    for rel, level in (("train/cat/a.png", 10), ("train/dog/b.png", 200),
                       ("test/dog/c.png", 120)):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (20, 20), level if mode == "L" else (level,) * 3).save(base / rel)
    return base


def test_class_list_is_the_union_over_splits(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    ds = load_dataset(cfg_for("cifar10", tmp_path, image_size=16), seed=0)
    assert ds.classes == ("cat", "dog")
    assert ds.test.labels.tolist() == [1]  # dog stays 1 although test has no cat
    assert ds.channels == 3  # grey-looking RGB files are still RGB files
    assert ds.train.images[0].float().mean().item() == pytest.approx(10, abs=1)


def test_greyscale_files_load_as_one_channel(tmp_path: Path) -> None:
    _write_folder(tmp_path, mode="L")
    ds = load_dataset(cfg_for("cifar10", tmp_path, image_size=16), seed=0)
    assert ds.channels == 1 and tuple(ds.train.images.shape) == (2, 1, 16, 16)


def test_corrupt_jpg_is_a_data_error_listing_it(tmp_path: Path) -> None:
    base = _write_folder(tmp_path)
    bad = base / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset(cfg_for("cifar10", tmp_path), seed=0)


def test_unreadable_torchvision_copy_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    broken = tmp_path / "torchvision" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    with pytest.raises(DataError, match="cifar-10-batches-py exists but torchvision"):
        load_dataset(cfg_for("cifar10", tmp_path), seed=0)


def test_missing_data_in_auto_mode_falls_back_loudly(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(cfg_for("pneumoniamnist", tmp_path), seed=0)
    assert ds.provenance.source == "synthetic-fallback"
    assert "not found" in ds.provenance.fallback_reason
    assert ds.classes == ("normal", "pneumonia") and ds.channels == 1
    banner = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "NOT FOUND" in banner and str(tmp_path / "pneumoniamnist.npz") in banner
    assert "FEDIMG_DATA" in banner


def test_missing_data_in_strict_mode_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found.*bccd_cells.*FEDIMG_DATA"):
        load_dataset(cfg_for("bccd_cells", tmp_path, source="strict"), seed=0)


def test_download_fails_fast_offline(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr("fedimg.data.roots.socket.create_connection", offline)
    start = time.perf_counter()
    ds = load_dataset(DataConfig(dataset="retinamnist", root=str(tmp_path), download=True),
                      seed=0)
    assert time.perf_counter() - start < 2.0
    assert "download failed" in ds.provenance.fallback_reason


def test_synthetic_is_seeded_and_learnable() -> None:
    synth = SyntheticConfig(num_classes=4, train_size=512, test_size=128, channels=3)
    cfg = DataConfig(dataset="synthetic", synthetic=synth, image_size=32)
    a, b, c = (load_dataset(cfg, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.provenance.source == "synthetic" and a.num_classes == 4
    # nearest class mean: 1.0 measured (chance 0.25)
    x, y = a.train.images.float().flatten(1), a.train.labels
    means = torch.stack([x[y == k].mean(0) for k in range(4)])
    pred = torch.cdist(a.test.images.float().flatten(1), means).argmin(1)
    assert (pred == a.test.labels).float().mean().item() > 0.9


def test_source_synthetic_mimics_the_named_dataset_even_when_present(shared_data) -> None:
    ds = load_dataset(cfg_for("retinamnist", shared_data, source="synthetic"), seed=0)
    assert ds.provenance.source == "synthetic" and ds.num_classes == 5


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'.*pneumoniamnist"):
        load_dataset(DataConfig(dataset="mnist"), seed=0)
    assert {"pneumoniamnist", "gtsrb", "cifar10", "synthetic"} <= set(DATASETS.names())


def test_resolve_data_root_order(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDIMG_DATA", str(tmp_path / "env"))
    assert resolve_data_root("/explicit") == Path("/explicit")
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("FEDIMG_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(None) == tmp_path / "xdg" / "fedimg"


def test_resize_keeps_a_constant_image_constant() -> None:
    images = torch.full((2, 3, 28, 28), 77, dtype=torch.uint8)
    out = resize_batch(images, 64)
    assert tuple(out.shape) == (2, 3, 64, 64) and out.unique().tolist() == [77]


def test_decode_cache_is_reused_and_invalidated_by_edits(tmp_path: Path,
                                                        isolated_data_cache: Path) -> None:
    base = _write_folder(tmp_path)
    load_dataset(cfg_for("cifar10", tmp_path, image_size=16), seed=0)
    cached = {p.name for p in (isolated_data_cache / "decoded").glob("cifar10_subset-*.npy")}
    shutil.copy(base / "train" / "dog" / "b.png", base / "train" / "cat" / "a.png")
    ds = load_dataset(cfg_for("cifar10", tmp_path, image_size=16), seed=0)
    after = {p.name for p in (isolated_data_cache / "decoded").glob("cifar10_subset-*.npy")}
    assert ds.train.images[0].float().mean().item() == pytest.approx(200, abs=1)
    assert len(after - cached) == 1
