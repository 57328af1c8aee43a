"""Faults in real Ray simulations: clients that raise or die, and a killed run resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedimg.simulate import run

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TINY = ["clients=3", "data.source=synthetic", "data.image_size=32",
        "data.synthetic.train_size=144", "data.synthetic.test_size=32",
        "data.min_partition_size=8", "data.partitioner=iid", "data.quantity_skew=0",
        "output.progress=false", "output.plots=false", "sim.ray_num_cpus=2"]


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_raising_client_and_a_killed_worker_do_not_stop_the_run(tmp_path) -> None:
    # Arrange: client 0 raises in round 1; client 1's worker process is SIGKILLed in round 2.
    run_dir = tmp_path / "run"
    argv = [*TINY, "rounds=4", f"hydra.run.dir={run_dir}", "faults.raise_at=[[1,0]]",
            "faults.kill_at=[[2,1]]"]
    # Act
    results = run(argv)
    # Assert: every round ran; the failed clients are recorded with their reasons ...
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4] and results["final"]["round"] == 4
    assert rounds[1]["fleet/ok"] == 2
    assert "injected fault" in rounds[1]["clients"]["0"]["train_status"]
    assert rounds[2]["fleet/ok"] == 2
    assert rounds[2]["clients"]["1"]["train_status"].startswith("failed")
    # ... and the dead worker was replaced: all three clients train again. Ray restarts
    # the actor while the run goes on; on a loaded machine round 3 can still find it
    # restarting (ActorUnavailableError, one failed client), so round 4 must have all.
    assert rounds[4]["fleet/ok"] == 3 and rounds[4]["fleet/failed"] == 0
    assert not any(r["skipped"] for r in rounds)


def _simulate(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedimg.simulate", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_during_round_3(run_dir: Path, argv: list[str]) -> None:
    proc = _simulate(argv)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        done = [r["round"] for r in _rounds(run_dir)] if (run_dir / "metrics.jsonl").exists() \
            else []
        if 2 in done:
            break
        time.sleep(0.2)
    time.sleep(1.0)  # round 3 is under way
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the server, its Ray workers, everything
    proc.wait()


def test_kill_9_then_resume_ends_with_the_metrics_of_an_uninterrupted_run(tmp_path) -> None:
    # Arrange: FedAdam (server moments) and DP-SGD (client ledgers), 4 rounds, seeded noise.
    argv = [*TINY, "rounds=4", "strategy=fedadam", "privacy=dp_sgd",
            "privacy.seeded_noise=true", "transfer.mode=head", "train.local_epochs=3"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # Act: kill -9 the whole process group mid-round 3, resume; and a run left alone
    _kill_during_round_3(killed, [*argv, f"hydra.run.dir={killed}"])
    assert max(r["round"] for r in _rounds(killed)) < 4
    resumed = run([f"resume={killed}"])
    uninterrupted = run([*argv, f"hydra.run.dir={clean}"])
    # Assert: the same rounds, once each, with the same metrics and the same epsilons
    timing = ("wall_s", "central_eval_s", "train/seconds")
    assert [r["round"] for r in _rounds(killed)] == [0, 1, 2, 3, 4]
    for a, b in zip(_rounds(killed), _rounds(clean)):
        assert {k: v for k, v in a.items() if k not in timing and k != "clients"} == \
            {k: v for k, v in b.items() if k not in timing and k != "clients"}
    assert resumed["privacy"]["clients"] == uninterrupted["privacy"]["clients"]
    assert resumed["privacy"]["clients"]["0"]["dp/epsilon"] > 0
    assert not list((killed / "checkpoints").glob(".*"))  # no half-written files left


def test_a_run_whose_clients_all_fail_stops_cleanly_with_its_results(tmp_path) -> None:
    # Arrange: both clients raise in rounds 1 and 2; no retries; two skips end the run.
    from fedimg.simulate import main

    run_dir = tmp_path / "run"
    argv = [*TINY, "clients=2", "rounds=4", f"hydra.run.dir={run_dir}",
            "faults.raise_at=[[1,0],[1,1],[2,0],[2,1]]", "fl.round_retries=0",
            "fl.max_skipped_rounds=2"]
    # Act
    code = main(argv)
    # Assert: exit code 8, rounds 1-2 recorded as skipped, results and checkpoints written
    assert code == 8
    results = json.loads((run_dir / "results.json").read_text())
    assert results["skipped_rounds"] == [1, 2]
    assert "2 rounds in a row were skipped" in results["stopped_early"]
    assert [r["skipped"] for r in _rounds(run_dir)] == [False, True, True]
    assert (run_dir / "checkpoints" / "final.pt").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
