"""``fedimg-server run resume=<run_dir>``: checked on the coordinator, then submitted."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedimg.config import to_dict
from fedimg.deploy import flwr_cli
from fedimg.deploy.server import main as server_main
from fedimg.reporting.run_dir import write_json
from fedimg.reporting.paths import RunPaths
from fedimg.resolve import compose_and_check


def _saved_run(run_dir: Path, *, deployed: bool) -> Path:
    """A run directory holding the resolved config, as a run writes it first."""
    overrides = ["rounds=3", f"output.run_dir={run_dir}"] + (["deploy.enabled=true"]
                                                              if deployed else [])
    cfg = compose_and_check("medical", overrides)
    run_dir.mkdir(parents=True)
    write_json(RunPaths(run_dir).config_json, {"config": to_dict(cfg)})
    return run_dir


def _recording(calls: list[list[str]]) -> Any:
    real = subprocess.run

    def fake(command: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(command, list) and Path(command[0]).name == "flwr":
            calls.append(command)
            return subprocess.CompletedProcess(command, 0)
        return real(command, *args, **kwargs)
    return fake


def test_resume_submits_the_saved_run_with_its_allowed_overrides(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange
    run_dir = _saved_run(tmp_path / "run", deployed=True)
    (run_dir / "results.json").write_text("{}")  # as the resumed run will leave it
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _recording(calls))
    # Act
    code = server_main(["run", f"resume={run_dir}", "rounds=5", "--connection", "fedimg"])
    # Assert
    (command,) = calls
    assert code == 0 and capsys.readouterr().out.endswith(f"run directory: {run_dir}\n")
    assert command[-1] == f'scenario="resume" overrides="resume={run_dir} rounds=5"'


@pytest.mark.parametrize("args, named", [
    (["trian.lr=0.1"], "cannot change a resumed run"),
    ([], "is a simulation, not a deployed run"),
])
def test_a_resume_that_cannot_work_exits_2_before_flwr(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, caplog, args: list[str],
                                                      named: str) -> None:
    # Arrange: a deployed run for the bad override, a simulated one otherwise
    run_dir = _saved_run(tmp_path / "run", deployed=bool(args))
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _recording(calls))
    # Act
    code = server_main(["run", f"resume={run_dir}", *args])
    # Assert
    assert code == 2 and calls == [] and named in caplog.text


def test_the_serverapp_reads_a_resume_from_its_run_config(tmp_path: Path) -> None:
    # Arrange: what flwr run hands the ServerApp
    run_dir = _saved_run(tmp_path / "run", deployed=True)
    scenario, overrides = flwr_cli._run_arguments([f"resume={run_dir}", "rounds=4"],
                                                runs_dir=tmp_path)
    # Act
    from fedimg.serverapp.checkpoint import config_from_argv

    cfg, resume = config_from_argv(overrides)
    # Assert
    assert scenario == "resume" and resume and cfg.rounds == 4
    assert cfg.output.run_dir == str(run_dir) and cfg.deploy.enabled


def test_a_run_that_failed_without_results_exits_1_with_its_reason(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog) -> None:
    # Arrange: flwr run exits 0 although the ServerApp failed at discovery
    run_dir = _saved_run(tmp_path / "run", deployed=True)
    (run_dir / "run.log").write_text("INFO starting\nfedimg.errors.FedimgError: 1 of 2 sites "
                                     "are ready; site hospital_b refuses this run\n")
    monkeypatch.setattr(subprocess, "run", _recording([]))
    # Act
    code = server_main(["run", f"resume={run_dir}"])
    # Assert
    assert code == 1 and "site hospital_b refuses this run" in caplog.text
