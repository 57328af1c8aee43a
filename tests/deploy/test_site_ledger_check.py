"""``fedimg-client --check`` opens the site's own privacy ledger: a damaged one stops the site."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from fedimg.deploy.client import main as client_main
from fedimg.deploy.site import load_site_config
from fedimg.errors import LedgerError
from fedimg.privacy.site_ledger import SiteLedger


def _site(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for k, name in enumerate(("a", "b")):
        (data / name).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (8, 8), (90 * k, 5 * i, 100)).save(data / name / f"{i:02d}.png")
    (tmp_path / "ca.crt").write_text("CA")
    (tmp_path / "node.key").write_text("KEY")
    path = tmp_path / "site.yaml"
    path.write_text(f"name: hospital_a\nsuperlink: 127.0.0.1:9692\nca_certificate: ca.crt\n"
                    f"private_key: node.key\ndata: {data}\ndevice: cpu\nclasses: [a, b]\n"
                    f"state_dir: {tmp_path / 'state'}\nfederation: xray\n")
    return path


def _trained(path: Path) -> SiteLedger:
    site = load_site_config(path)
    book = SiteLedger.open(site.ledger_dir, federation=site.federation_key, site=site.name)
    book.record("run-1", {"target_epsilon": 8.0, "delta": 1e-3, "noise_multiplier": 1.1,
                          "sample_rate": 0.25, "accountant": "prv", "history": [[1.1, 0.25, 4]],
                          "stopped_round": None, "class_weights": None})
    return book


def test_check_of_a_site_with_an_intact_ledger_passes(tmp_path: Path, monkeypatch,
                                                      caplog) -> None:
    # Arrange
    monkeypatch.setenv("FEDIMG_CACHE", str(tmp_path / "cache"))
    path = _site(tmp_path)
    _trained(path)
    # Act
    with caplog.at_level(logging.INFO):
        code = client_main(["--site", str(path), "--check"])
    # Assert
    assert code == 0 and "1 run(s) on record" in caplog.text


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_check_of_a_trained_site_whose_ledger_is_damaged_exits_12(tmp_path: Path, monkeypatch,
                                                                  caplog, damage: str) -> None:
    # Arrange
    monkeypatch.setenv("FEDIMG_CACHE", str(tmp_path / "cache"))
    path = _site(tmp_path)
    book = _trained(path)
    if damage == "deleted":
        book.path.unlink()
    else:
        book.path.write_text(book.path.read_text()[:40])
    # Act
    with caplog.at_level(logging.ERROR):
        code = client_main(["--site", str(path), "--check"])
    # Assert
    assert code == LedgerError.exit_code == 12
    assert "refusing to train" in caplog.text and "Fix:" in caplog.text
