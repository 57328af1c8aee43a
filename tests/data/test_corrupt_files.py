"""Corrupt input: image files under data.on_corrupt=refuse|skip, the decode cache, npz files."""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedimg.config import DataConfig
from fedimg.data import load_dataset
from fedimg.data.decode import Decoded, apply_corrupt_policy
from fedimg.errors import ConfigError, DataError

# 6 train (3 per class) and 4 test images; image k (from 1) is a flat grey of level 10 * k.
GOOD = {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}}
NOT_AN_IMAGE = b"this is a text file, not an image\n"


def truncated_png() -> bytes:
    """The first half of a real (noisy, so not tiny) PNG."""
    noise = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def make_folder(root: Path, corrupt: dict[str, bytes]) -> Path:
    """A ``bccd_cells`` image folder with metadata.csv (path, cls, level) and ``corrupt`` files.

    Every corrupt file also gets a metadata row (level -1), which must be dropped with it.
    """
    base = root / "bccd_cells"
    rows, level = [], 0
    for split, classes in GOOD.items():
        for cls, count in classes.items():
            for i in range(count):
                level += 10
                rel = f"{split}/{cls}/img{i}.png"
                (base / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 20), (level,) * 3).save(base / rel)
                rows.append((rel, cls, level))
    for rel, data in corrupt.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
        rows.append((rel, rel.split("/")[1], -1))
    with open(base / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "cls", "level"])
        writer.writerows(rows)
    return base


def folder_cfg(root: Path, on_corrupt: str = "refuse") -> DataConfig:
    return DataConfig(dataset="bccd_cells", root=str(root), download=False, image_size=16,
                      on_corrupt=on_corrupt)


THREE_BAD = {"train/a/empty.png": b"", "train/b/notes.jpg": NOT_AN_IMAGE,
             "test/b/half.png": truncated_png()}


def test_refuse_names_every_corrupt_file_and_the_way_out(tmp_path: Path) -> None:
    # Arrange: a zero-byte png, a text file named .jpg, a truncated png (2 splits)
    make_folder(tmp_path, THREE_BAD)
    # Act
    with pytest.raises(DataError) as info:
        load_dataset(folder_cfg(tmp_path), seed=0)
    # Assert
    message = str(info.value)
    assert "3 of 13 image files" in message
    for rel in THREE_BAD:
        assert rel in message
    assert "train/a/empty.png (OSError: empty file (0 bytes))" in message
    assert "cannot identify image file 'notes.jpg'" in message
    assert "data.on_corrupt=skip" in message


def test_refuse_lists_the_first_ten_and_counts_the_rest(tmp_path: Path) -> None:
    make_folder(tmp_path, {f"train/a/bad{i:02d}.png": b"" for i in range(12)})
    with pytest.raises(DataError) as info:
        load_dataset(folder_cfg(tmp_path), seed=0)
    message = str(info.value)
    assert "12 of 22 image files" in message
    assert all(f"bad{i:02d}.png" in message for i in range(10))
    assert "bad10.png" not in message and "(+2 more)" in message


def assert_aligned(split, classes: tuple[str, ...]) -> None:
    """Pixels, labels and metadata rows describe the same file, sample by sample."""
    levels = split.metadata["level"].astype(int)
    means = split.images.float().mean(dim=(1, 2, 3)).round().int().tolist()
    assert means == levels.tolist()
    assert np.array(classes)[split.labels.numpy()].tolist() == split.metadata["cls"].tolist()


def test_skip_drops_exactly_the_corrupt_files_and_keeps_rows_aligned(tmp_path: Path,
                                                                     caplog) -> None:
    # Arrange
    make_folder(tmp_path, THREE_BAD)
    # Act
    with caplog.at_level(logging.WARNING, logger="fedimg.data.decode"):
        ds = load_dataset(folder_cfg(tmp_path, "skip"), seed=0)
    # Assert: the 10 good images remain, each with its own label and metadata row
    assert (len(ds.train), len(ds.test)) == (6, 4)
    assert ds.train.metadata["level"].astype(int).tolist() == [10, 20, 30, 40, 50, 60]
    assert ds.test.metadata["level"].astype(int).tolist() == [70, 80, 90, 100]
    assert_aligned(ds.train, ds.classes)
    assert_aligned(ds.test, ds.classes)
    # ... and the skipped files are named in the log and in the provenance (results.json)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    (warning,) = [w for w in ds.provenance.warnings if "corrupt" in w]
    for rel in THREE_BAD:
        assert rel in logged and rel in warning
    assert "skipped 3 corrupt image file(s)" in warning
    assert ds.provenance.source == "real"


def test_skip_records_every_name_even_beyond_the_listed_ten(tmp_path: Path) -> None:
    make_folder(tmp_path, {f"train/a/bad{i:02d}.png": NOT_AN_IMAGE for i in range(12)})
    ds = load_dataset(folder_cfg(tmp_path, "skip"), seed=0)
    (warning,) = [w for w in ds.provenance.warnings if "corrupt" in w]
    assert all(f"train/a/bad{i:02d}.png" in warning for i in range(12))
    assert len(ds.train) == 6


def test_skip_refuses_a_split_left_without_images(tmp_path: Path) -> None:
    base = make_folder(tmp_path, {})
    for path in (base / "test").rglob("*.png"):
        path.write_bytes(b"")
    with pytest.raises(DataError, match=r"every image of .*test is corrupt"):
        load_dataset(folder_cfg(tmp_path, "skip"), seed=0)


def test_decode_cache_neither_hides_corrupt_files_nor_misaligns(tmp_path: Path,
                                                                 monkeypatch) -> None:
    # Arrange: decode once (skip), then forbid decoding so later loads must hit the cache
    monkeypatch.setenv("FEDIMG_CACHE", str(tmp_path / "cache"))
    base = make_folder(tmp_path, {"train/a/broken.jpg": NOT_AN_IMAGE})
    first = load_dataset(folder_cfg(tmp_path, "skip"), seed=0)
    sidecars = list((tmp_path / "cache" / "decoded").glob("bccd_cells-*.corrupt.json"))
    assert len(sidecars) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr("fedimg.data.decode._decode_all", no_decoding)
        # Act / Assert: a cache hit still refuses, and still skips the same file
        with pytest.raises(DataError, match="train/a/broken.jpg"):
            load_dataset(folder_cfg(tmp_path, "refuse"), seed=0)
        again = load_dataset(folder_cfg(tmp_path, "skip"), seed=0)
    assert again.train.metadata["level"].tolist() == first.train.metadata["level"].tolist()
    assert_aligned(again.train, again.classes)
    # A cache whose sidecar is lost is not trusted: decoded again, still refused
    sidecars[0].unlink()
    with pytest.raises(DataError, match="train/a/broken.jpg"):
        load_dataset(folder_cfg(tmp_path, "refuse"), seed=0)
    # Replacing the file (an edit: new size and mtime) makes it count again
    Image.new("RGB", (20, 20), (250,) * 3).save(base / "train/a/broken.jpg", "JPEG")
    fixed = load_dataset(folder_cfg(tmp_path, "refuse"), seed=0)
    assert len(fixed.train) == 7


def test_unknown_on_corrupt_value_lists_the_valid_ones() -> None:
    decoded = Decoded(images=np.zeros(0), corrupt={})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data.on_corrupt='ignore' is unknown; valid: "
                                          "refuse, skip"):
        apply_corrupt_policy(decoded.named([]), total=0, where="x", on_corrupt="ignore")


# --- torchvision's GTSRB layout: .ppm files decoded through the same policy -----------

def make_tv_gtsrb(root: Path, *, bad_train: str, bad_test: str) -> dict[str, int]:
    """Train: classes 00000/00001 x tracks 00000/00001, 2 frames each; test: 2 images.

    Returns the grey level of every track id (``<class>_<track>``).
    """
    base = root / "torchvision" / "gtsrb"
    levels = {}
    for c in ("00000", "00001"):
        for t in ("00000", "00001"):
            levels[f"{c}_{t}"] = level = 40 + 40 * len(levels)
            folder = base / "GTSRB" / "Training" / c
            folder.mkdir(parents=True, exist_ok=True)
            for frame in ("00000", "00001"):
                Image.new("RGB", (20, 20), (level,) * 3).save(folder / f"{t}_{frame}.ppm")
    (base / "GTSRB" / "Training" / "00001" / bad_train).write_bytes(NOT_AN_IMAGE)
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    for name in ("00000.ppm", "00001.ppm"):
        Image.new("RGB", (20, 20), (30,) * 3).save(test / name)
    (test / bad_test).write_bytes(b"")
    rows = [f"{n};20;20;0;0;19;19;{k}" for k, n in enumerate(["00000.ppm", "00001.ppm", bad_test])]
    (base / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n" + "\n".join(rows) + "\n")
    return levels


def gtsrb_cfg(root: Path, on_corrupt: str) -> DataConfig:
    return DataConfig(dataset="gtsrb", root=str(root), download=False, image_size=16,
                      on_corrupt=on_corrupt)


def test_torchvision_gtsrb_refuses_naming_corrupt_files_of_both_splits(tmp_path: Path) -> None:
    make_tv_gtsrb(tmp_path, bad_train="00009_00000.ppm", bad_test="00002.ppm")
    with pytest.raises(DataError) as info:
        load_dataset(gtsrb_cfg(tmp_path, "refuse"), seed=0)
    message = str(info.value)
    assert "2 of 12 image files" in message
    assert "GTSRB/Training/00001/00009_00000.ppm" in message
    assert "GTSRB/Final_Test/Images/00002.ppm" in message


def test_torchvision_gtsrb_skip_keeps_labels_and_tracks_aligned(tmp_path: Path) -> None:
    levels = make_tv_gtsrb(tmp_path, bad_train="00009_00000.ppm", bad_test="00002.ppm")
    ds = load_dataset(gtsrb_cfg(tmp_path, "skip"), seed=0)
    assert (len(ds.train), len(ds.test)) == (8, 2)
    tracks = ds.train.metadata["track"].tolist()
    assert "00001_00009" not in tracks
    means = ds.train.images.float().mean(dim=(1, 2, 3)).round().int().tolist()
    assert means == [levels[t] for t in tracks]
    assert ds.train.labels.tolist() == [int(t.split("_")[0]) for t in tracks]
    assert ds.test.labels.tolist() == [0, 1]
    (warning,) = ds.provenance.warnings
    assert "00009_00000.ppm" in warning and "00002.ppm" in warning


# --- MedMNIST .npz ------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_npz_is_a_data_error_naming_the_file(damage: str, shared_data: Path,
                                                    tmp_path: Path) -> None:
    # Arrange: the first half of a real file, or a zero-byte file
    target = tmp_path / "retinamnist" / "retinamnist.npz"
    target.parent.mkdir()
    data = (shared_data / "retinamnist" / "retinamnist.npz").read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    cfg = DataConfig(dataset="retinamnist", root=str(tmp_path), download=False)
    # Act / Assert: corrupt is not missing, so auto mode must not fall back to synthetic
    with pytest.raises(DataError, match=re.escape(f"{target} is truncated or corrupt")) as info:
        load_dataset(cfg, seed=0)
    assert "Fix: delete it and download it again" in str(info.value)
    if damage == "empty":
        assert "empty (0 bytes)" in str(info.value)
