"""Your own data by path: folder, manifest and npz readers, carving, and bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedimg.config.compose import compose_config
from fedimg.data import load_dataset
from fedimg.data.carve import carve_test, share
from fedimg.errors import ConfigError, DataError
from manifests import ham_manifest


def _image(path: Path, value: int, *, mode: str = "RGB", size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":  # a 16-bit greyscale scan: value..value*200 spans the range
        ramp = np.linspace(value, value * 200, size * size, dtype=np.uint16)
        Image.fromarray(ramp.reshape(size, size)).save(path)  # uint16: mode I;16
        return
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def _folder(root: Path, *, per_class: dict[str, int], split: str | None = None) -> Path:
    for k, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            parts = [split] if split else []
            _image(root.joinpath(*parts, name, f"{name}_{i}.png"), 40 + 80 * k)
    return root


def _load(dataset: str, path: Path, *extra: str):
    cfg = compose_config("medical", [f"data.dataset={dataset}", f"data.path={path}",
                                     "data.image_size=16", *extra])
    return load_dataset(cfg.data, seed=0)


def test_a_folder_of_class_folders_gets_a_stratified_carved_test_split(tmp_path: Path) -> None:
    # Arrange: 10 cats and 5 dogs, no split folders
    root = _folder(tmp_path / "pets", per_class={"cat": 10, "dog": 5})
    # Act
    ds = _load("folder", root)
    # Assert: round(0.2 * 10) = 2 cats and round(0.2 * 5) = 1 dog carved off
    assert ds.classes == ("cat", "dog") and ds.channels == 3
    assert np.bincount(ds.test.labels.numpy()).tolist() == [2, 1]
    assert np.bincount(ds.train.labels.numpy()).tolist() == [8, 4]


def test_a_folder_with_train_and_test_keeps_them(tmp_path: Path) -> None:
    # Arrange
    _folder(tmp_path / "d", per_class={"a": 4, "b": 3}, split="train")
    _folder(tmp_path / "d", per_class={"a": 2, "b": 2}, split="test")
    # Act
    ds = _load("folder", tmp_path / "d")
    # Assert
    assert (len(ds.train), len(ds.test)) == (7, 4)
    assert ds.provenance.source == "real"


def test_greyscale_colour_and_16_bit_files_mix_into_rgb(tmp_path: Path) -> None:
    # Arrange: one class greyscale (one of them 16-bit), the other RGB
    _image(tmp_path / "m" / "grey" / "a.png", 50, mode="L", size=20)
    _image(tmp_path / "m" / "grey" / "b.png", 100, mode="I;16", size=8)
    _image(tmp_path / "m" / "grey" / "c.jpg", 70, mode="L", size=30)
    for i in range(3):
        _image(tmp_path / "m" / "colour" / f"{i}.png", 200)
    # Act
    ds = _load("folder", tmp_path / "m")
    # Assert: all RGB at 16 px; the 16-bit ramp is stretched to 0..255, not clipped white
    images = np.concatenate([ds.train.images.numpy(), ds.test.images.numpy()])
    assert images.shape[1:] == (3, 16, 16)
    stretched = [im for im in images if im.min() < 30 and im.max() > 225]
    assert len(stretched) == 1


def _manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_manifest_gives_labels_splits_and_metadata_columns(tmp_path: Path) -> None:
    # Arrange: 2 sites, labels as numbers, one test row per class
    rows = []
    for i in range(8):
        label = str(i % 2 * 10)  # "0" and "10": numeric order, not "10" < "2"
        _image(tmp_path / "img" / f"{i}.png", 30 * i)
        rows.append({"path": f"img/{i}.png", "label": label, "split": "test" if i >= 6
                     else "train", "site": "north" if i < 4 else "south"})
    # Act
    ds = _load("manifest", _manifest(tmp_path / "m.csv", rows))
    # Assert
    assert ds.classes == ("0", "10")
    assert ds.train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.train.metadata["site"].tolist() == ["north"] * 4 + ["south"] * 2
    assert ds.test.metadata["site"].tolist() == ["south", "south"]


def test_a_grouped_carve_never_splits_a_patient(tmp_path: Path) -> None:
    # Arrange: 10 patients with 3 images each, 5 per class
    rows = []
    for patient in range(10):
        for j in range(3):
            name = f"p{patient}_{j}.png"
            _image(tmp_path / name, 10 * patient + j)
            rows.append({"path": name, "label": "sick" if patient < 5 else "well",
                         "patient": f"P{patient}"})
    # Act
    ds = _load("manifest", _manifest(tmp_path / "m.csv", rows), "data.group_column=patient")
    # Assert: round(0.2 * 5) = 1 patient per class, all 3 of its images, in test
    test_patients = set(ds.test.metadata["patient"].tolist())
    assert len(test_patients) == 2 and len(ds.test) == 6
    assert not test_patients & set(ds.train.metadata["patient"].tolist())


def test_an_npz_without_a_test_split_is_carved_and_named_classes_kept(tmp_path: Path) -> None:
    # Arrange
    images = np.arange(20 * 8 * 8, dtype=np.uint8).reshape(20, 8, 8)
    labels = np.repeat([0, 1], 10)[:, None]
    np.savez(tmp_path / "x.npz", train_images=images, train_labels=labels,
             classes=np.array(["benign", "malignant"]))
    # Act
    ds = _load("npz", tmp_path / "x.npz")
    # Assert
    assert ds.classes == ("benign", "malignant") and ds.channels == 1
    assert (len(ds.train), len(ds.test)) == (16, 4)


@pytest.mark.parametrize("rows, named", [
    ([{"path": "gone.png", "label": "a"}], "1 row(s) names a file that does not exist: line(s) 2"),
    ([{"path": "ok.png", "label": ""}], "1 row(s) has an empty label: line(s) 2"),
    ([{"path": "ok.png", "label": "a", "split": "holdout"}], "a split other than train"),
])
def test_bad_manifest_rows_are_named_by_line(tmp_path: Path, rows: list, named: str) -> None:
    # Arrange
    _image(tmp_path / "ok.png", 9)
    path = _manifest(tmp_path / "m.csv", rows)
    # Act
    with pytest.raises(DataError) as err:
        _load("manifest", path)
    # Assert
    assert named in str(err.value) and "Fix:" in str(err.value)


def test_a_manifest_without_a_label_column_names_its_columns(tmp_path: Path) -> None:
    path = _manifest(tmp_path / "m.csv", [{"path": "a.png", "class": "x"}])
    with pytest.raises(DataError, match=r"no label column \(columns: \['path', 'class'\]\)"):
        _load("manifest", path)


def test_one_class_only_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path / "one", per_class={"only": 6})
    with pytest.raises(DataError, match="one class only \\('only'\\)"):
        _load("folder", root)


def test_a_class_the_test_split_lacks_is_refused(tmp_path: Path) -> None:
    _folder(tmp_path / "d", per_class={"a": 3, "b": 3}, split="train")
    _folder(tmp_path / "d", per_class={"a": 2}, split="test")
    with pytest.raises(DataError, match="the test split of .* has no image of class 'b'"):
        _load("folder", tmp_path / "d")


def test_a_group_column_with_empty_values_is_refused(tmp_path: Path) -> None:
    rows = [{"path": f"{i}.png", "label": str(i % 2), "site": "" if i == 3 else "x"}
            for i in range(6)]
    for i in range(6):
        _image(tmp_path / f"{i}.png", i)
    with pytest.raises(DataError, match="group_column='site' is empty for 1 of 6"):
        _load("manifest", _manifest(tmp_path / "m.csv", rows), "data.group_column=site")


def test_a_missing_path_and_a_path_without_a_path_dataset_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        _load("folder", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.path=.* is read only by data.dataset"):
        compose_config("medical", [f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="reads its images from data.path, which is not set"):
        compose_config("medical", ["data.dataset=manifest"])


def test_a_relative_path_is_found_under_the_data_root(tmp_path: Path, monkeypatch) -> None:
    # Arrange: a folder dataset under the data root, and a working directory elsewhere
    for split, n in (("train", 4), ("test", 2)):
        for label in ("a", "b"):
            for i in range(n):
                _image(tmp_path / "root" / "sites" / split / label / f"{i}.png", i)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDIMG_DATA", str(tmp_path / "root"))
    # Act
    found = _load("folder", "sites")
    # Assert: 8 training and 4 test images, read from $FEDIMG_DATA/sites
    assert (len(found.train), len(found.test)) == (8, 4)
    with pytest.raises(DataError, match=r"nor under the data root .*root\)"):
        _load("folder", "elsewhere")


def test_shares_round_half_up_and_keep_one_on_each_side() -> None:
    assert [share(n, 0.2) for n in (1, 2, 5, 10, 12, 13)] == [0, 1, 1, 2, 2, 3]
    assert share(3, 0.9) == 2  # never the whole class


def test_the_carve_does_not_depend_on_the_run_seed() -> None:
    labels = np.repeat([0, 1, 2], 10)
    assert carve_test(labels, test_fraction=0.3).sum() == 9
    assert (carve_test(labels, test_fraction=0.3) == carve_test(labels, test_fraction=0.3)).all()


def test_a_manifest_of_ham_sites_gives_the_folder_route_exactly(shared_data: Path,
                                                                 tmp_path: Path) -> None:
    # Arrange
    folder, manifest = ham_manifest(shared_data, tmp_path / "ham.csv")
    # Act
    by_folder, by_manifest = _load("folder", folder), _load("manifest", manifest)
    # Assert: the same images, labels and site columns, in the same order
    assert by_folder.classes == by_manifest.classes == ("melanoma", "nevus")
    for split in ("train", "test"):
        a, b = getattr(by_folder, split), getattr(by_manifest, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert (a.metadata["site"] == b.metadata["site"]).all()
    assert (len(by_folder.train), len(by_folder.test)) == (1420, 579)


def _hf_dict(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["cat", "dog"]),
                                  "site": datasets.Value("string")})
    rows = {"img": [Image.fromarray(np.full((10 + i, 12, 3), 20 * i, dtype=np.uint8))
                    for i in range(8)],
            "label": [i % 2 for i in range(8)], "site": ["a"] * 4 + ["b"] * 4}
    train = datasets.Dataset.from_dict(rows, features=features)
    test = datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()}, features=features)
    return datasets.DatasetDict({"train": train, "test": test})


def test_a_hugging_face_dataset_saved_to_disk(tmp_path: Path) -> None:
    # Arrange
    _hf_dict(tmp_path).save_to_disk(str(tmp_path / "saved"))
    # Act
    cfg = compose_config("medical", [f"data.dataset=hf:{tmp_path / 'saved'}",
                                     "data.image_size=16"])
    ds = load_dataset(cfg.data, seed=0)
    # Assert: ClassLabel names, both splits, the site column as metadata
    assert ds.classes == ("cat", "dog") and (len(ds.train), len(ds.test)) == (8, 4)
    assert ds.train.images.shape == (8, 3, 16, 16)
    assert ds.train.metadata["site"].tolist() == ["a"] * 4 + ["b"] * 4
    assert ds.train.labels.tolist() == [0, 1] * 4


def test_a_hugging_face_folder_goes_through_flwr_datasets(tmp_path: Path) -> None:
    # Arrange: parquet files named by split, as on the Hub
    folder = tmp_path / "pq"
    folder.mkdir()
    for split, data in _hf_dict(tmp_path).items():
        data.to_parquet(str(folder / f"{split}.parquet"))
    # Act
    cfg = compose_config("medical", [f"data.dataset=hf:{folder}", "data.image_size=16"])
    ds = load_dataset(cfg.data, seed=0)
    # Assert
    assert ds.classes == ("cat", "dog") and (len(ds.train), len(ds.test)) == (8, 4)


def test_a_hub_dataset_missing_offline_names_the_cache(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose_config("medical", ["data.dataset=hf:fedimg-test/no-such-set"])
    with pytest.raises(DataError, match="reads the datasets cache at .*Fix:"):
        load_dataset(cfg.data, seed=0)
    with pytest.raises(ConfigError, match="names a Hugging Face dataset after 'hf:'"):
        compose_config("medical", ["data.dataset=hf:"])


def test_any_manifest_column_drives_a_natural_partition(tmp_path: Path) -> None:
    # Arrange: 3 scanners with 10, 6 and 4 images (a small site is a client too)
    from fedimg.data import partition_dataset

    rows = []
    for i, scanner in enumerate(["s1"] * 10 + ["s2"] * 6 + ["s3"] * 4):
        _image(tmp_path / f"{i}.png", i)
        rows.append({"path": f"{i}.png", "label": str(i % 2), "split": "train",
                     "scanner": scanner})
    rows += [{"path": f"{i}.png", "label": str(i % 2), "split": "test", "scanner": "s1"}
             for i in range(2)]
    manifest = _manifest(tmp_path / "m.csv", rows)
    cfg = compose_config("medical", ["data.dataset=manifest", f"data.path={manifest}",
                                     "data.image_size=16", "data.partitioner=natural",
                                     "data.natural_column=scanner", "clients=3",
                                     "data.min_partition_size=2"])
    ds = load_dataset(cfg.data, seed=0)
    # Act
    parts = partition_dataset(ds.train, cfg=cfg.data, num_clients=3, seed=0)
    # Assert: one client per scanner, every image of it (train + val), largest first
    scanners = ds.train.metadata["scanner"]
    sizes = []
    for part in parts:
        members = np.concatenate([part.train_indices, part.val_indices])
        assert len(set(scanners[members])) == 1
        sizes.append(len(members))
    assert sizes == [10, 6, 4]
