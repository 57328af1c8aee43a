"""A site's local data: layouts, class matching, corrupt files, the split and the fingerprint.

Every image is a flat colour: red identifies the class folder, green the file,
so a test can check, sample by sample, that each label belongs to its pixels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedimg.data.site import SiteData, read_site_data, site_dataset, site_fingerprint
from fedimg.data.types import ImageSet
from fedimg.errors import ConfigError, DataError

# Federation order differs from the alphabetical folder order on purpose.
CLASSES = ("WBC", "Platelets", "RBC")
RED = {"Platelets": 40, "RBC": 120, "WBC": 200, "00000": 40, "00002": 200, "0": 40, "1": 120}
NOT_AN_IMAGE = b"this is a text file, not an image\n"


def make_images(folder: Path, count: int, *, red: int, mode: str = "RGB") -> None:
    """``count`` flat 20x20 images; image i has green 10 * i (grey level red in mode L)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colour = red if mode == "L" else (red, 10 * i, 7)
        Image.new(mode, (20, 20), colour).save(folder / f"img{i:02d}.png")


def make_site(root: Path, counts: dict[str, int]) -> Path:
    """A ``<class>/<image>`` site with ``counts[folder]`` images per class folder."""
    for folder, count in counts.items():
        make_images(root / folder, count, red=RED[folder])
    return root


def read(path: Path, **kwargs) -> SiteData:
    args = {"classes": CLASSES, "image_size": 16, "min_samples": 4, **kwargs}
    return read_site_data(path, **args)


def pixels(images) -> list[tuple[int, int]]:
    """(red, green) of every image: which class folder and which file it came from."""
    return [tuple(px) for px in images[:, :2, 0, 0].tolist()]


def assert_labels_match_pixels(site: SiteData, by_red: dict[int, str]) -> None:
    for part in (site.train, site.val):
        reds = part.images[:, 0, 0, 0].tolist()
        assert [site.classes[i] for i in part.labels.tolist()] == [by_red[r] for r in reds]


THIRTY = {"Platelets": 10, "RBC": 10, "WBC": 10}


# --- folder layouts ------------------------------------------------------------------

def test_folder_site_holds_out_one_image_per_class_in_federation_order(tmp_path: Path) -> None:
    # Arrange: 3 classes x 10 images; val_count(30, 0.1) = 3, i.e. 30 * 3 / 30 = 1 per class
    site_dir = make_site(tmp_path / "site", THIRTY)
    # Act
    site = read(site_dir)
    # Assert
    assert (len(site.train), len(site.val)) == (27, 3)
    assert site.label_counts == [9, 9, 9]
    assert sorted(site.val.labels.tolist()) == [0, 1, 2]
    assert tuple(site.train.images.shape) == (27, 3, 16, 16)
    assert site.train.images.dtype == site.val.images.dtype == torch.uint8
    assert site.classes == CLASSES and site.location == str(site_dir.resolve())
    assert_labels_match_pixels(site, {40: "Platelets", 120: "RBC", 200: "WBC"})
    assert site.warnings == ()


def test_a_quarter_hold_out_spreads_the_remainder_over_classes(tmp_path: Path) -> None:
    # val_count(30, 0.25) = round(7.5) = 8: 8 * 10 / 30 = 2.67 -> 2 each + 2 remainders
    site = read(make_site(tmp_path, THIRTY), val_fraction=0.25)
    assert (len(site.train), len(site.val)) == (22, 8)
    assert sorted(np.bincount(site.val.labels.numpy()).tolist()) == [2, 3, 3]
    assert sorted(site.label_counts) == [7, 7, 8]


def test_train_and_val_folders_are_used_as_given_and_test_is_ignored(tmp_path: Path) -> None:
    # Arrange: train 3 x 6, val 3 x 2, test 3 x 1, and a metadata.csv (path, level)
    for split, count in (("train", 6), ("val", 2), ("test", 1)):
        for folder in ("Platelets", "RBC", "WBC"):
            make_images(tmp_path / split / folder, count, red=RED[folder])
    with open(tmp_path / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "green"])
        writer.writerows((p.relative_to(tmp_path).as_posix(), int(p.stem[3:]) * 10)
                         for p in sorted(tmp_path.rglob("*.png")))
    # Act
    site = read(tmp_path)
    # Assert
    assert (len(site.train), len(site.val)) == (18, 6)
    assert site.label_counts == [6, 6, 6]
    assert_labels_match_pixels(site, {40: "Platelets", 120: "RBC", 200: "WBC"})
    for part in (site.train, site.val):
        greens = [g for _, g in pixels(part.images)]
        assert part.metadata["green"].astype(int).tolist() == greens


def test_numbered_class_folders_map_to_class_indices(tmp_path: Path) -> None:
    # GTSRB-style 00000 and 00002 -> classes 0 and 2; val_count(10, 0.2) = 2, 1 per class
    site = read(make_site(tmp_path, {"00000": 5, "00002": 5}), classes=("a", "b", "c"),
                val_fraction=0.2)
    assert site.label_counts == [4, 0, 4]
    assert_labels_match_pixels(site, {40: "a", 200: "c"})


def test_classes_csv_maps_folders_to_names_before_numbers(tmp_path: Path) -> None:
    # Folder 0 is "Platelets" by classes.csv, which is class 1 here (not class 0)
    make_site(tmp_path, {"0": 5, "1": 5})
    (tmp_path / "classes.csv").write_text("class_id,name\n0,Platelets\n1,RBC\n")
    site = read(tmp_path, classes=("RBC", "Platelets"), val_fraction=0.2)
    assert site.label_counts == [4, 4]
    assert_labels_match_pixels(site, {40: "Platelets", 120: "RBC"})


def test_unknown_class_folder_is_named_with_the_valid_classes(tmp_path: Path) -> None:
    make_site(tmp_path, THIRTY)
    make_images(tmp_path / "Neutrophil", 3, red=90)
    with pytest.raises(DataError) as info:
        read(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path))
    assert "Neutrophil" in message and "(WBC, Platelets, RBC)" in message


def test_hidden_and_non_image_files_are_ignored(tmp_path: Path) -> None:
    make_site(tmp_path, THIRTY)
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "SOURCE.txt").write_text("where the images came from\n")
    (tmp_path / "RBC" / "._img00.png").write_bytes(NOT_AN_IMAGE)  # macOS resource fork
    (tmp_path / ".ipynb_checkpoints").mkdir()
    site = read(tmp_path)
    assert (len(site.train), len(site.val)) == (27, 3)


def test_greyscale_stays_one_channel_and_mixed_folders_become_rgb(tmp_path: Path) -> None:
    for folder in ("Platelets", "RBC", "WBC"):
        make_images(tmp_path / "grey" / folder, 4, red=RED[folder], mode="L")
    grey = read(tmp_path / "grey")
    make_site(tmp_path / "grey", {"WBC": 4})  # overwrites WBC with RGB images
    mixed = read(tmp_path / "grey")
    assert grey.train.images.shape[1] == 1 and mixed.train.images.shape[1] == 3


# --- corrupt files, too little data, bad paths ---------------------------------------

BAD = {"RBC/empty.png": b"", "WBC/notes.jpg": NOT_AN_IMAGE}


def make_corrupt_site(root: Path) -> Path:
    make_site(root, THIRTY)
    for rel, data in BAD.items():
        (root / rel).write_bytes(data)
    return root


def test_corrupt_files_are_refused_by_relative_path(tmp_path: Path) -> None:
    make_corrupt_site(tmp_path)
    with pytest.raises(DataError) as info:
        read(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path))
    assert "2 of 32 image files" in message
    assert "RBC/empty.png (OSError: empty file (0 bytes))" in message
    assert "WBC/notes.jpg" in message and "on_corrupt=skip" in message


def test_skip_drops_corrupt_files_and_names_them_in_the_warnings(tmp_path: Path) -> None:
    site = read(make_corrupt_site(tmp_path), on_corrupt="skip")
    assert len(site.train) + len(site.val) == 32 - 2
    assert (len(site.train), len(site.val)) == (27, 3)
    (warning,) = site.warnings
    assert all(rel in warning for rel in BAD)
    assert_labels_match_pixels(site, {40: "Platelets", 120: "RBC", 200: "WBC"})


def test_too_few_samples_states_the_counts(tmp_path: Path) -> None:
    # 6 images: val_count(6, 0.1) = 1, so 5 remain for training
    make_site(tmp_path, {"Platelets": 2, "RBC": 2, "WBC": 2})
    with pytest.raises(DataError, match="5 training and 1 validation images") as info:
        read(tmp_path, min_samples=16)
    assert "min_samples=16" in str(info.value)


def test_an_empty_val_folder_is_not_silently_replaced(tmp_path: Path) -> None:
    for folder in ("Platelets", "RBC", "WBC"):
        make_images(tmp_path / "train" / folder, 4, red=RED[folder])
    (tmp_path / "val" / "RBC").mkdir(parents=True)
    with pytest.raises(DataError, match="12 training and 0 validation images"):
        read(tmp_path)


@pytest.mark.parametrize("case", ["missing", "empty", "files only", "no images"])
def test_unusable_paths_are_data_errors_starting_with_the_path(tmp_path: Path,
                                                               case: str) -> None:
    path = tmp_path / "site"
    if case != "missing":
        path.mkdir()
    if case == "files only":
        (path / "metadata.csv").write_text("path\n")
    if case == "no images":
        (path / "RBC").mkdir()
        (path / "RBC" / "notes.txt").write_text("no image here\n")
    with pytest.raises(DataError) as info:
        read(path)
    assert str(info.value).startswith(str(path)) and "Fix:" in str(info.value)


def test_unknown_on_corrupt_value_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="on_corrupt='ignore' is unknown; valid: refuse, skip"):
        read(make_site(tmp_path, THIRTY), on_corrupt="ignore")


# --- npz sites -----------------------------------------------------------------------

def write_npz(path: Path, labels: Sequence[int], *, val: Sequence[int] = (),
              column: bool = True) -> Path:
    """Grey 8x8 images whose level is 20 * label; labels as (N, 1) or (N,)."""
    def arrays(split: str, values: Sequence[int]) -> dict[str, np.ndarray]:
        lab = np.asarray(values, dtype=np.int64)
        images = np.repeat((20 * lab).astype(np.uint8)[:, None, None], 8, 1).repeat(8, 2)
        return {f"{split}_images": images,
                f"{split}_labels": lab[:, None] if column else lab}
    np.savez(path, **arrays("train", labels), **(arrays("val", val) if val else {}))
    return path


def test_npz_with_column_labels_holds_out_validation(tmp_path: Path) -> None:
    # 12 images: val_count(12, 0.1) = round(1.2) = 1
    site = read(write_npz(tmp_path / "site.npz", [0, 1, 2] * 4))
    assert (len(site.train), len(site.val)) == (11, 1)
    assert tuple(site.train.images.shape) == (11, 1, 16, 16)
    assert (site.train.images[:, 0, 0, 0] == 20 * site.train.labels).all()


def test_npz_val_arrays_are_used_as_given(tmp_path: Path) -> None:
    site = read(write_npz(tmp_path / "s.npz", [0, 0, 1, 1, 2], val=[2, 1], column=False))
    assert (len(site.train), len(site.val)) == (5, 2)
    assert site.label_counts == [2, 2, 1] and site.val.labels.tolist() == [2, 1]


def test_npz_label_outside_the_classes_is_named(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "s.npz", [0, 1, 2, 7, 1, 7])
    with pytest.raises(DataError) as info:
        read(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "2 of 6 train_labels lie outside [0, 3): 7 (2 images)" in message


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not really a zip"])
def test_empty_or_corrupt_npz_is_a_data_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="Fix:") as info:
        read(path)
    assert str(info.value).startswith(str(path))


# --- split rule, resource cap, determinism -------------------------------------------

def test_max_samples_caps_the_training_part_by_class(tmp_path: Path) -> None:
    # 27 training images capped at 12: 12 * 9 / 27 = 4 per class; val untouched
    site = read(make_site(tmp_path, THIRTY), max_samples=12)
    assert (len(site.train), len(site.val)) == (12, 3)
    assert site.label_counts == [4, 4, 4]


def test_the_split_depends_on_the_seed_only(tmp_path: Path) -> None:
    make_site(tmp_path, THIRTY)
    first, again, other = (read(tmp_path, seed=s, max_samples=12) for s in (0, 0, 1))
    assert pixels(first.val.images) == pixels(again.val.images)
    assert pixels(first.train.images) == pixels(again.train.images)
    assert pixels(first.train.images) != pixels(other.train.images)
    assert len(set(pixels(first.train.images)) & set(pixels(first.val.images))) == 0


# --- fingerprint ---------------------------------------------------------------------

def test_fingerprint_is_stable_and_changes_with_the_files(tmp_path: Path) -> None:
    make_site(tmp_path, THIRTY)
    before = site_fingerprint(tmp_path)
    assert site_fingerprint(tmp_path) == before and len(before) == 16
    # an edit: new content, size and mtime
    Image.new("RGB", (21, 20), (1, 2, 3)).save(tmp_path / "RBC" / "img00.png")
    edited = site_fingerprint(tmp_path)
    make_images(tmp_path / "WBC2", 1, red=3)
    added = site_fingerprint(tmp_path)
    assert len({before, edited, added}) == 3


def test_fingerprint_of_an_npz_follows_its_mtime(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "s.npz", [0, 1, 2])
    before = site_fingerprint(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert site_fingerprint(path) != before


# --- the shared real data (skipped when absent) ---------------------------------------

def test_real_bccd_cells_site_keeps_labels_and_metadata_aligned(shared_data: Path) -> None:
    site = read_site_data(shared_data / "bccd_cells", classes=CLASSES, image_size=16)
    assert sum(site.label_counts) == len(site.train) and len(site.val) > 0
    for part in (site.train, site.val):
        assert (np.array(CLASSES)[part.labels.numpy()] == part.metadata["label"]).all()


def test_an_npz_without_training_images_is_too_small(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, train_images=np.zeros((0, 8, 8), np.uint8),
             train_labels=np.zeros((0, 1), np.int64))
    with pytest.raises(DataError, match="0 training and 0 validation images"):
        read(path)


def test_npz_labels_of_another_length_than_the_images_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    np.savez(path, train_images=np.zeros((6, 8, 8), np.uint8),
             train_labels=np.zeros((5, 1), np.int64))
    with pytest.raises(DataError, match=r"train_labels is int64 \(5, 1\) for 6 images"):
        read(path)


def test_a_site_is_a_one_client_dataset_train_rows_then_val_rows() -> None:
    # Arrange: 5 training and 2 validation images of a 2-class federation
    train = ImageSet(images=torch.zeros(5, 3, 8, 8, dtype=torch.uint8),
                     labels=torch.tensor([0, 1, 1, 0, 1]))
    val = ImageSet(images=torch.ones(2, 3, 8, 8, dtype=torch.uint8), labels=torch.tensor([1, 0]))
    site = SiteData(train=train, val=val, classes=("a", "b"), location="/site", warnings=("w",))
    # Act
    dataset, (part,) = site_dataset(site, name="folder")
    # Assert
    assert dataset.train.labels.tolist() == [0, 1, 1, 0, 1, 1, 0]
    assert part.train_indices.tolist() == [0, 1, 2, 3, 4] and part.val_indices.tolist() == [5, 6]
    assert float(dataset.train.images[5:].min()) == 1.0  # the val rows come last
    assert dataset.test is val and dataset.classes == ("a", "b") and dataset.channels == 3
    assert dataset.provenance.location == "/site" and dataset.provenance.warnings == ("w",)
