"""The Flower-native path from the README: `flwr run . local` with fedimg's apps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("flwr") is None, reason="flwr CLI not on PATH")
def test_flwr_run_local_simulation_writes_a_run_directory(tmp_path, tiny_overrides) -> None:
    # Arrange: a private FLWR_HOME, so the local SuperLink's database lives in tmp_path.
    home, run_dir = tmp_path / "flwr_home", tmp_path / "run"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    overrides = " ".join([f"hydra.run.dir={run_dir}", *tiny_overrides])
    cmd = ["flwr", "run", ".", "local", "--stream",
           "--federation-config", "num-supernodes=2",
           "--run-config", f'scenario="medical" overrides="{overrides}"']
    try:
        # Act
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        subprocess.run(["pkill", "-f", str(home)], check=False)  # the local SuperLink
    # Assert
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final"]["round"] == 1 and results["final"]["fleet/ok"] == 2
    assert (run_dir / "checkpoints" / "final.pt").is_file()
