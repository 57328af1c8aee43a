"""The privacy sweep: argument parsing, grid points, tables and plots."""

from __future__ import annotations

import json
import math

import pytest

from fedimg.errors import ConfigError
from fedimg.audit.plots import plot_sweep
from fedimg.audit.sweep import markdown, parse_args, point_args, summarise, write_tables


def test_parse_args_splits_sweep_options_from_scenario_overrides() -> None:
    sweep, rest = parse_args(["scenario=medical_dp", "sweep.epsilons=[1,4,inf]",
                              "sweep.seeds=[0,1]", "rounds=2", "sweep.lira_shadows=4"])
    assert sweep.epsilons == [1.0, 4.0, math.inf]
    assert sweep.seeds == [0, 1] and sweep.lira_shadows == 4
    assert rest == ["scenario=medical_dp", "rounds=2"]


@pytest.mark.parametrize("arg, message", [("sweep.epsilon=[1]", "unknown sweep option"),
                                          ("sweep.epsilons=[0,1]", "positive"),
                                          ("sweep.mode=local", "valid: dp_sgd, client_dp")])
def test_parse_args_rejects_bad_options(arg, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args([arg])


def test_point_args_infinite_epsilon_is_the_same_pipeline_without_dp(tmp_path) -> None:
    sweep, _ = parse_args([])
    assert point_args(sweep, 2.0, 1, tmp_path)[:3] == [
        "privacy=dp_sgd", "privacy.target_epsilon=2.0", "seed=1"]
    assert point_args(sweep, math.inf, 0, tmp_path)[:2] == ["privacy=none", "transfer.bn=frozen"]


def _fake_run(run_dir, eps: float, acc: float) -> dict:
    """A run directory as the simulator writes it (metrics.jsonl with per-client epsilon)."""
    run_dir.mkdir(parents=True)
    rounds = [{"round": 0, "test/accuracy": 0.5, "clients": {}}]
    for r in (1, 2):
        clients = {str(c): {"train": {"dp/epsilon": eps * r / 2 * (1 - 0.1 * c)}}
                   for c in range(2)} if math.isfinite(eps) else {"0": {"train": {}}}
        rounds.append({"round": r, "test/accuracy": acc, "clients": clients})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds))
    return {"target_epsilon": eps, "seed": 0, "epsilon": eps, "delta": 1e-3,
            "test/accuracy": acc, "test/balanced_accuracy": acc - 0.1, "test/auc": acc + 0.1,
            "mia_loss_auc": 0.55, "mia_loss_tpr@1%": 0.02, "lira_auc": None,
            "lira_tpr@0.1%": None, "lira_tpr@1%": None, "bound_tpr@1%": 0.05,
            "clients_stopped": 0, "rounds_s": 10.0, "run_dir": str(run_dir)}


def test_tables_and_plots(tmp_path) -> None:
    rows = [_fake_run(tmp_path / "a", 1.0, 0.7), _fake_run(tmp_path / "b", math.inf, 0.9)]
    rows += [{**rows[0], "seed": 1, "test/accuracy": 0.8}, {**rows[1], "seed": 1}]
    # Act
    summary = summarise(rows)
    write_tables(tmp_path, rows)
    plots = plot_sweep(tmp_path, rows, summary)
    # Assert: mean and std over the two seeds of epsilon=1, and one row for no DP
    assert [s["target_epsilon"] for s in summary] == [1.0, math.inf]
    assert summary[0]["test/accuracy"] == pytest.approx(0.75)
    assert summary[0]["test/accuracy_std"] == pytest.approx(0.0707, abs=1e-4)
    assert summary[1]["seeds"] == 2 and summary[0]["lira_auc"] is None
    assert math.isinf(summary[1]["epsilon"]) and summary[1]["epsilon_std"] == 0.0
    text = (tmp_path / "sweep.md").read_text()
    assert "| inf |" in text and "0.75" in text
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 5
    assert {p.name for p in plots} == {"accuracy_vs_epsilon.png", "mia_vs_epsilon.png",
                                       "accuracy_vs_round.png", "epsilon_per_client.png"}
    assert all(p.stat().st_size > 5000 for p in plots)
    assert markdown([{"a": 1.23456}], ["a"]).splitlines()[2] == "| 1.235 |"
