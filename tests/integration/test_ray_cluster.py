"""`sim.ray_address` joins an existing Ray cluster (here a one-machine `ray start --head`)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess

import pytest

from fedimg.simulate import run

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not on PATH")
def test_simulation_joins_a_running_ray_cluster(tmp_path, tiny_overrides) -> None:
    # Arrange: the head of a cluster, as on the first machine of a multi-machine run.
    port = _free_port()
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120)
    try:
        # Act
        results = run([f"hydra.run.dir={tmp_path}", f"sim.ray_address=127.0.0.1:{port}",
                       *tiny_overrides])
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
    # Assert: both clients trained on the cluster's workers.
    assert results["final"]["fleet/ok"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["config"]["sim"][
        "ray_address"] == f"127.0.0.1:{port}"
