"""A CSV manifest of the shared ham_sites folder, for tests that compare the two routes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest


def ham_manifest(shared_data: Path, out: Path) -> tuple[Path, Path]:
    """(the ham_sites folder, a manifest of it at ``out``); skips the test if absent.

    The rows are the folder's metadata.csv with the split taken from each path, in the
    folder reader's order (split, then class and file name), with absolute paths.
    """
    folder = shared_data / "ham_sites"
    if not folder.is_dir():
        pytest.skip("ham_sites is not in the shared data")
    with open(folder / "metadata.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle),
                      key=lambda r: (r["path"].split("/")[0] != "train", r["path"]))
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "split", "site",
                                                    "lesion_id"])
        writer.writeheader()
        writer.writerows({"path": str(folder / r["path"]), "label": r["label"],
                          "split": r["path"].split("/")[0], "site": r["site"],
                          "lesion_id": r["lesion_id"]} for r in rows)
    return folder, out
