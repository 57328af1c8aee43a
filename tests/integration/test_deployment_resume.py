"""A deployed run killed after round 2 and resumed (``fedimg-server run resume=``).

Real SuperLink and two site daemons on localhost (TLS, node authentication). The
ServerApp process is killed with SIGKILL once round 2's checkpoint is written; the
resumed run must end with the metrics of a run never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from site_images import write_site_images

from fedimg.deploy.certs import create_dev_pki
from fedimg.deploy.localhost import LocalFederation, free_port, site_yaml

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("flower-superlink") is None,
                                 reason="Flower's deployment CLIs are not installed")]

CLASSES = ("Platelets", "RBC", "WBC")
SITES = ("hospital_a", "hospital_b")
RUN = ["scenario=medical", "data.dataset=bccd_cells", "data.image_size=32", "rounds=3",
       "clients=2", "transfer.mode=head", "train.local_steps=4", "fl.central_eval=false",
       "fl.fraction_evaluate=0", "fl.min_evaluate_clients=0",  # half the messages
       "output.progress=false"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("resume_federation")
    fed = LocalFederation(root, connection="fedimg-resume")
    create_dev_pki(root / "pki", nodes=list(SITES))
    (root / "keys").mkdir()
    try:
        fed.superlink(pki=root / "pki", keys=_keys(root))
        for seed, name in enumerate(SITES):
            write_site_images(root / "data" / name, classes=CLASSES, per_class=12, seed=seed)
            pki = root / "pki"
            fed.daemon(name, site_yaml(
                root / f"{name}.yaml", name=name, superlink=fed.address, ca=pki / "ca.crt",
                key=pki / "nodes" / f"{name}.key", data=root / "data" / name,
                classes=CLASSES, port=free_port(), state_dir=root / "state" / name))
        yield fed
    finally:
        fed.stop_all()


def _keys(root: Path) -> Path:
    for name in SITES:
        shutil.copy(root / "pki" / "nodes" / f"{name}.pub", root / "keys")
    return root / "keys"


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _kill_server_app_after_round_2(fed: LocalFederation, run_dir: Path) -> None:
    deadline = time.monotonic() + 600
    while not any(r["round"] == 2 for r in _rounds(run_dir)):
        assert time.monotonic() < deadline, "round 2 never ended"
        time.sleep(0.1)
    pids = subprocess.run(["pgrep", "-f", "flwr-serverapp"], capture_output=True,
                          text=True).stdout.split()
    assert pids, "no ServerApp process to kill"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


def _final(run_dir: Path) -> dict[str, float]:
    """The final training metrics, timings (``train/seconds``) aside."""
    final = json.loads((run_dir / "results.json").read_text())["final"]
    return {k: v for k, v in final.items()
            if k.startswith("train/") and not k.endswith("seconds")}


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)["state_dict"]


def test_a_killed_deployed_run_resumes_to_the_metrics_of_an_uninterrupted_one(
        federation) -> None:
    # Arrange: an uninterrupted run, and one whose ServerApp dies after round 2
    fed = federation
    clean, clean_dir = fed.run(RUN)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    killed_dir = fed.root / "runs" / "killed"
    proc = fed.submit([*RUN, f"output.run_dir={killed_dir}"])
    _kill_server_app_after_round_2(fed, killed_dir)
    fed.cancel(proc)
    assert max(r["round"] for r in _rounds(killed_dir)) < 3
    # Act
    resumed, run_dir = fed.run([f"resume={killed_dir}"])
    # Assert
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert run_dir == killed_dir
    assert [r["round"] for r in _rounds(killed_dir)] == [0, 1, 2, 3]
    assert _final(killed_dir) == pytest.approx(_final(clean_dir), rel=1e-6)
    resumed_model, clean_model = _final_model(killed_dir), _final_model(clean_dir)
    assert resumed_model.keys() == clean_model.keys()
    for key, value in clean_model.items():  # the same global model, bit for bit
        assert torch.equal(resumed_model[key], value), key
