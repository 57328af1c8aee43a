"""FedNova, SCAFFOLD and FedDyn in real Ray simulations; SCAFFOLD killed with -9 and resumed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fault_tolerance import TINY, _kill_during_round_3, _rounds

from fedimg.serverapp.state_codec import decode
from fedimg.simulate import run

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

HEAD = ["transfer.mode=head"]  # a trained head, a frozen trunk: no control for frozen arrays


def _strategy_state(run_dir: Path) -> dict:
    payload = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return decode(json.loads(payload["state_json"]), payload["state_tensors"])["strategy"]


@pytest.mark.parametrize("strategy", ["scaffold", "fednova", "feddyn"])
def test_a_short_simulation_runs_end_to_end(tmp_path, strategy: str) -> None:
    # Arrange
    run_dir = tmp_path / "run"
    # Act
    results = run([*TINY, *HEAD, "rounds=2", f"strategy={strategy}",
                   f"hydra.run.dir={run_dir}"])
    # Assert: both rounds aggregated every client's update
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1, 2] and results["final"]["round"] == 2
    assert all(r["fleet/ok"] == 3 and not r["skipped"] for r in rounds[1:])
    state = _strategy_state(run_dir)
    if strategy == "scaffold":  # c and each c_i, for the trained head only
        assert set(state["control"]) == {"_fc.weight", "_fc.bias"}
        assert sorted(state["client_controls"]) == [0, 1, 2]
        assert np.abs(state["control"]["_fc.weight"]).max() > 0


def test_scaffold_killed_mid_round_3_and_resumed_ends_like_an_uninterrupted_run(tmp_path
                                                                              ) -> None:
    # Arrange: 4 rounds of SCAFFOLD, two of three clients sampled per round
    argv = [*TINY, *HEAD, "rounds=4", "strategy=scaffold", "fl.fraction_train=0.67"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    # Act: kill -9 the whole process group mid-round 3, resume; and a run left alone
    _kill_during_round_3(killed, [*argv, f"hydra.run.dir={killed}"])
    assert max(r["round"] for r in _rounds(killed)) < 4
    run([f"resume={killed}"])
    run([*argv, f"hydra.run.dir={clean}"])
    # Assert: the same rounds with the same metrics ...
    timing = ("wall_s", "central_eval_s", "train/seconds", "clients")
    assert [r["round"] for r in _rounds(killed)] == [0, 1, 2, 3, 4]
    for a, b in zip(_rounds(killed), _rounds(clean)):
        assert {k: v for k, v in a.items() if k not in timing} == \
            {k: v for k, v in b.items() if k not in timing}
    # ... the same final model, and the same server and client control variates
    final = [torch.load(d / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
             for d in (killed, clean)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[1])
    got, want = _strategy_state(killed), _strategy_state(clean)
    assert sorted(got["client_controls"]) == sorted(want["client_controls"])
    for key, value in want["control"].items():
        assert (got["control"][key] == value).all()
    for client, controls in want["client_controls"].items():
        assert all((got["client_controls"][client][k] == v).all() for k, v in controls.items())
