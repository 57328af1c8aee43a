"""A real federation on localhost: SuperLink + 2 SuperNodes over TLS with node authentication.

Everything goes through the product's own launchers (``python -m fedimg.server`` and
``python -m fedimg.client``) and Flower's real processes: the development PKI, key
registration, warm client daemons reading their own image folders, a 2-round run
whose run directory the server writes, a SuperLink restart the daemons survive, and
the sites that must be refused: an unregistered key, a client without the CA, and
data with a corrupt image or an unknown class.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedimg.deploy.certs import create_dev_pki
from fedimg.deploy.localhost import LocalFederation, free_port, site_yaml

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flower-superlink") is None,
                                 reason="Flower's deployment CLIs are not installed")]

CLASSES = ("Platelets", "RBC", "WBC")  # the bccd_cells class list the run checks sites against
RUN = ["scenario=medical", "data.dataset=bccd_cells", "data.image_size=32", "rounds=2",
       "clients=2", "transfer.mode=head", "train.local_epochs=1", "output.progress=false"]


def _images(folder: Path, *, per_class: int, seed: int) -> None:
    """Tiny PNGs whose mean colour depends on the class, so a model can learn something."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((24, 24, 3)) + 60.0
            base[..., k] += 120.0
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{seed}_{i}.png")


def _site(fed: LocalFederation, name: str, data: Path, *, file: str | None = None,
          key: str | None = None, ca: Path | None = None) -> Path:
    pki = fed.root / "pki"
    return site_yaml(fed.root / f"{file or name}.yaml", name=name, superlink=fed.address,
                     ca=ca or pki / "ca.crt", key=pki / "nodes" / f"{key or name}.key",
                     data=data, classes=CLASSES, port=free_port(),
                     state_dir=fed.root / "state" / name)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("federation")
    fed = LocalFederation(root)
    create_dev_pki(root / "pki", nodes=["hospital_a", "hospital_b", "intruder"])
    (root / "keys").mkdir()
    for name in ("hospital_a", "hospital_b"):  # the intruder's key is never registered
        shutil.copy(root / "pki" / "nodes" / f"{name}.pub", root / "keys")
    for seed, site in enumerate(("site_a", "site_b")):
        _images(root / "data" / site, per_class=12, seed=seed)
    for split in ("train", "test"):  # the server's own held-out set for central evaluation
        _images(root / "server_data" / "bccd_cells" / split, per_class=6, seed=10)
    try:
        fed.superlink(pki=root / "pki", keys=root / "keys")
        for name, data in (("hospital_a", "site_a"), ("hospital_b", "site_b")):
            fed.daemon(name, _site(fed, name, root / "data" / data))
        yield fed
    finally:
        fed.stop_all()


def test_two_sites_train_two_rounds_and_the_server_writes_the_run(federation) -> None:
    # Act
    proc, run_dir = federation.run([*RUN, f"data.root={federation.root / 'server_data'}"])
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final"]["round"] == 2 and results["final"]["fleet/ok"] == 2
    sites = results["data"]["sites"]
    assert [s["name"] for s in sites.values()] == ["hospital_a", "hospital_b"]
    # 36 images per site: round(0.1 * 36) = 4 held out for validation, 32 to train.
    assert [(s["num_train"], s["num_val"]) for s in sites.values()] == [(32, 4), (32, 4)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["clients"][c]["train"]["num_examples"] == 32
               for r in records[1:] for c in ("0", "1"))
    assert 0.0 <= results["final"]["test/accuracy"] <= 1.0  # the server's own test split
    for name in ("config.yaml", "results.json", "checkpoints/final.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "plots").glob("*.png"))


def test_daemons_rejoin_after_the_superlink_restarts(federation) -> None:
    # Arrange: the in-memory SuperLink forgets every node; its launcher re-registers keys.
    federation.stop("server")
    federation.superlink(pki=federation.root / "pki", keys=federation.root / "keys")
    # Act: the daemons' SuperNodes notice, and their supervisors start them again.
    proc, run_dir = federation.run([*RUN, "rounds=1", "fl.central_eval=false",
                                    "fl.connect_timeout_s=120"])
    # Assert
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["final"]["fleet/ok"] == 2


def _daemon(federation: LocalFederation, site: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "fedimg.client", "--site", str(site)],
                          env=federation.env, capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_node_whose_key_is_not_registered_is_refused(federation) -> None:
    site = _site(federation, "intruder", federation.root / "data" / "site_a")
    code, output = _daemon(federation, site)
    assert code == 10, output[-2000:]
    assert "Failed to activate SuperNode" in output and "not registered" in output


def test_a_client_without_the_federation_ca_cannot_connect(federation) -> None:
    # Arrange: a site trusting some other CA (it lacks the federation's certificate).
    other = create_dev_pki(federation.root / "other_pki")
    site = _site(federation, "hospital_a", federation.root / "data" / "site_a",
                 file="no_ca", ca=other.ca_cert)
    # Act
    code, output = _daemon(federation, site)
    # Assert: TLS refuses the server's certificate; the daemon exits 2 (no retry loop).
    assert code == 2, output[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in output


@pytest.mark.parametrize("damage, named", [
    ("corrupt", "RBC/broken.png"),
    ("unknown_class", "Neutrophil"),
])
def test_a_site_with_bad_data_is_refused_before_it_joins(federation, damage, named) -> None:
    # Arrange: a copy of a good site folder with one problem.
    root = federation.root
    data = root / f"bad_{damage}"
    shutil.copytree(root / "data" / "site_a", data)
    if damage == "corrupt":
        (data / "RBC" / "broken.png").write_bytes(b"not a png")
    else:
        shutil.copytree(data / "WBC", data / "Neutrophil")
    site = _site(federation, "hospital_b", data, file=damage)
    # Act
    code, output = _daemon(federation, site)
    # Assert: exit 3 (DataError) naming the problem; no SuperNode was started.
    assert code == 3, output[-2000:]
    assert named in output and "starting SuperNode" not in output
