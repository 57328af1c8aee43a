"""The recipe search of a comparison: chosen on federated validation, never on test."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

import fedimg.compare.selection as selection
import fedimg.simulate
from fedimg.compare.grid import parse_args, run_grid
from fedimg.compare.search import search_points
from fedimg.compare.selection import score_points, select_point, validation_view
from fedimg.config.checks import check_search
from fedimg.config.codec import decode_search
from fedimg.config.schema import SearchConfig
from fedimg.errors import ConfigError
from test_compare_grid import SMALL


def write_run(run_dir: Path, rounds: list[dict[str, Any]]) -> Path:
    """A fabricated run directory: metrics.jsonl (rounds 0..n) and results.json."""
    run_dir.mkdir(parents=True)
    records = [{"round": i, **r} for i, r in enumerate(rounds)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "results.json").write_text(json.dumps(
        {"final": records[-1], "best": max(records, key=lambda r: r.get("test/auc", 0)),
         "timing": {"total_s": 1.0}}))
    return run_dir


def fabricated(tmp_path: Path, vals: list[list[float]], tests: list[float]) -> list[list[Path]]:
    """Point i, seed j: final val/balanced_accuracy vals[i][j], test metrics tests[i]."""
    return [[write_run(tmp_path / f"p{i}s{j}", [
        {"test/balanced_accuracy": 0.25},
        {"val/balanced_accuracy": 0.99, "test/balanced_accuracy": tests[i]},  # a better round
        {"val/balanced_accuracy": v, "val/loss": 1 - v, "test/balanced_accuracy": tests[i],
         "test/auc": tests[i], "train/accuracy": tests[i]}])
        for j, v in enumerate(seed_vals)] for i, seed_vals in enumerate(vals)]


VALS = [[0.5, 0.75], [0.875, 0.625], [0.625, 0.625]]  # means 0.625, 0.75, 0.625


def test_the_point_with_the_best_mean_final_validation_wins(tmp_path: Path) -> None:
    # Arrange: 3 points x 2 seeds; every run's round 1 has val 0.99 (final round counts)
    runs = fabricated(tmp_path, VALS, tests=[0.5, 0.5, 0.5])
    # Act
    chosen, values = score_points(runs, metric="val/balanced_accuracy")
    tie, _ = score_points([runs[0], runs[2]], metric="val/balanced_accuracy")
    by_loss, _ = score_points(runs, metric="val/loss")  # 1 - v: means 0.375, 0.25, 0.375
    # Assert: point 1 (0.75); of the tie 0.625 = 0.625 the earlier; a loss is minimised
    assert chosen == 1 and values == VALS
    assert tie == 0 and by_loss == 1
    assert select_point([None, 0.5, None], metric="val/auc") == 1


def test_a_planted_test_metric_does_not_change_the_choice(tmp_path: Path,
                                                         monkeypatch) -> None:
    # Arrange: point 0 has by far the best test figures, point 1 the best validation
    runs = fabricated(tmp_path, VALS, tests=[0.99, 0.01, 0.5])
    # Act
    chosen, _ = score_points(runs, metric="val/balanced_accuracy")
    # Assert: validation's choice; selecting on test would have picked point 0
    assert chosen == 1

    # Arrange: test values that raise as soon as anything reads them
    class Poison:
        def __getattribute__(self, name: str) -> Any:
            raise AssertionError(f"the selection read a test metric ({name})")

    real = selection.read_jsonl

    def poisoned(path: Path) -> list[dict[str, Any]]:
        return [{k: Poison() if k.startswith("test/") else v for k, v in r.items()}
                for r in real(path)]

    monkeypatch.setattr(selection, "read_jsonl", poisoned)
    # Act / Assert: the same choice, and no test value was touched
    assert score_points(runs, metric="val/balanced_accuracy")[0] == 1
    assert validation_view({"val/auc": 0.5, "test/auc": 0.9, "train/loss": 1.0}) == {
        "val/auc": 0.5}


def test_a_test_metric_is_refused_as_the_select_metric(tmp_path: Path, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(fedimg.simulate, "run", lambda argv: calls.append(argv) or {})
    with pytest.raises(ConfigError, match="compare.select_metric='test/auc' is a test metric"):
        check_search(decode_search({"select_metric": "test/auc"}), output_metric="val/auc")
    with pytest.raises(ConfigError, match="output.select_metric .*'train/accuracy' is not"):
        check_search(SearchConfig(lr=[0.1]), output_metric="train/accuracy")
    with pytest.raises(ConfigError, match="is a test metric"):
        run_grid([*SMALL, "compare.strategy=[local]", "compare.lr=[0.1,0.01]",
                  "compare.select_metric=test/balanced_accuracy", f"compare.dir={tmp_path}"])
    for bad, why in (({"lr": [0.1, 0.1]}, "repeats a value"), ({"local_steps": [0]},
                     "must be > 0"), ({"search_seeds": []}, "at least one seed"),
                     ({"ridge_lambda": [1.0, -1.0]}, r"compare.ridge_lambda=\[1.0, -1.0\] is")):
        with pytest.raises(ConfigError, match=why):
            check_search(decode_search(bad), output_metric="val/auc")
    with pytest.raises(ConfigError, match="not a val/ metric"):
        selection.metric_value({"test/auc": 0.9}, "test/auc")
    assert calls == []


def test_search_arguments_and_the_points_of_each_strategy() -> None:
    grid, rest = parse_args(["compare.lr=[0.1,0.01]", "compare.server_lr=[1,0.5]",
                             "compare.search_seeds=7", "compare.strategy=[fedavg,fedadam]"])
    assert grid.axes == {"strategy": ["fedavg", "fedadam"], "seed": [0, 1, 2]} and rest == []
    assert grid.search == SearchConfig(lr=[0.1, 0.01], server_lr=[1.0, 0.5], search_seeds=[7])
    # 2 lr values; FedAdam also reads fl.server_lr: 2 x 2, lr slowest
    assert len(search_points(grid.search, reads_server_lr=False)) == 2
    assert search_points(grid.search, reads_server_lr=True)[:2] == [
        {"train.lr": 0.1, "fl.server_lr": 1.0}, {"train.lr": 0.1, "fl.server_lr": 0.5}]
    assert parse_args([])[0].search == SearchConfig()  # no axis: no search
    # The closed-form head's penalty is an axis of every strategy, searched last
    ridge = parse_args(["compare.lr=[0.1]", "compare.ridge_lambda=[0.1,1]"])[0].search
    assert search_points(ridge, reads_server_lr=False) == [
        {"train.lr": 0.1, "fl.ridge_lambda": 0.1}, {"train.lr": 0.1, "fl.ridge_lambda": 1.0}]


def fake_run(argv: list[str]) -> dict[str, Any]:
    """A run without training: val from (lr, server_lr, seed), test planted against it."""
    args = dict(a.split("=", 1) for a in argv)
    lr, seed = float(args["train.lr"]), int(args["seed"])
    val = {0.01: 0.5, 0.1: 0.75 if seed == 0 else 0.25}[lr]
    val += 0.125 if args.get("fl.server_lr") == "0.5" else 0.0
    test = 0.9 if lr == 0.1 else 0.1  # test alone would choose lr=0.1 everywhere
    write_run(Path(args["hydra.run.dir"]), [
        {"test/balanced_accuracy": 0.25},
        {"val/balanced_accuracy": val, "test/balanced_accuracy": test, "test/auc": test}])
    return {}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_search_chooses_on_validation_reports_test_and_resumes(tmp_path: Path,
                                                                 monkeypatch) -> None:
    # Arrange: FedAvg 2 points, FedAdam 2 x 2 (it reads fl.server_lr), search seeds 0, 1
    calls: list[list[str]] = []
    monkeypatch.setattr(fedimg.simulate, "run", lambda argv: calls.append(argv) or
                        fake_run(argv))
    args = [*SMALL, "compare.strategy=[fedavg,fedadam]", "compare.seed=[1,2]",
            "compare.lr=[0.01,0.1]", "compare.server_lr=[1.0,0.5]",
            "compare.search_seeds=[0,1]", f"compare.dir={tmp_path / 'grid'}"]
    # Act
    root = run_grid(args)
    first = len(calls)
    run_grid(args)
    # Assert: 2x2 + 4x2 search runs, then seed 2 of each (seed 1 reuses its search run)
    assert first == 14 and len(calls) == 14
    search = read_csv(root / "search.csv")
    assert len(search) == 12 and {r["strategy"] for r in search} == {"fedavg", "fedadam"}
    assert not any(k.startswith("test") for r in search for k in r)
    selected = {r["strategy"]: r for r in read_csv(root / "selected.csv")}
    # FedAvg: lr 0.01 (0.5, 0.5) ties lr 0.1 (0.75, 0.25): the earlier point, lr 0.01
    assert (selected["fedavg"]["train.lr"], selected["fedavg"]["fl.server_lr"]) == ("0.01", "")
    assert float(selected["fedavg"]["score"]) == 0.5
    # FedAdam: 0.625 at (0.01, 0.5) and at (0.1, 0.5): the earlier, (0.01, 0.5)
    assert (selected["fedadam"]["train.lr"], selected["fedadam"]["fl.server_lr"]) == (
        "0.01", "0.5")
    assert float(selected["fedadam"]["score"]) == 0.625
    rows = read_csv(root / "compare.csv")
    assert [(r["strategy"], r["seed"], r["train.lr"]) for r in rows] == [
        ("fedavg", "1", "0.01"), ("fedavg", "2", "0.01"),
        ("fedadam", "1", "0.01"), ("fedadam", "2", "0.01")]
    assert {float(r["balanced_accuracy"]) for r in rows} == {0.1}  # lr 0.01's planted test
    assert Path(rows[0]["run_dir"]).parent.name == "search"  # seed 1 reused
    summary = {r["strategy"]: r for r in read_csv(root / "compare_summary.csv")}
    assert summary["fedadam"]["fl.server_lr"] == "0.5" and summary["fedadam"]["seeds"] == "2"
    assert "## Recipe search" in (root / "compare.md").read_text()


def test_a_failed_search_run_scores_nothing_and_is_not_rerun(tmp_path: Path,
                                                             monkeypatch) -> None:
    # Arrange: lr=0.1 crashes (as a diverged run does); lr=0.01 runs
    calls: list[list[str]] = []

    def flaky(argv: list[str]) -> dict[str, Any]:
        calls.append(argv)
        if "train.lr=0.1" in argv:
            raise ValueError("Input contains NaN.")
        return fake_run(argv)

    monkeypatch.setattr(fedimg.simulate, "run", flaky)
    args = [*SMALL, "compare.strategy=[fedavg]", "compare.seed=[0]", "compare.lr=[0.1,0.01]",
            f"compare.dir={tmp_path}"]
    # Act: the search, then the same command again
    run_grid(args)
    first = len(calls)
    run_grid(args)
    # Assert: 2 search runs (seed 0 is reported from its search run); none rerun
    assert first == 2 and len(calls) == 2
    search = read_csv(tmp_path / "search.csv")
    assert [(r["train.lr"], r["status"], r["score"]) for r in search] == [
        ("0.1", "failed", ""), ("0.01", "ok", "0.5")]
    assert read_csv(tmp_path / "selected.csv")[0]["train.lr"] == "0.01"
    failed = Path(search[0]["run_dir"]) / "search_failed.txt"
    assert failed.read_text() == "ValueError: Input contains NaN.\n"


def test_a_server_lr_no_strategy_reads_and_a_doubly_set_key_are_refused(tmp_path: Path
                                                                        ) -> None:
    with pytest.raises(ConfigError, match="compare.server_lr=\\[0.5\\] applies to no strategy"):
        run_grid([*SMALL, "compare.strategy=[local,fedavg]", "compare.server_lr=[0.5]",
                  f"compare.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="compare.train.lr and compare.lr both set"):
        run_grid([*SMALL, "compare.strategy=[local]", "compare.lr=[0.5]",
                  "compare.train.lr=[0.1]", f"compare.dir={tmp_path}"])


def test_a_tiny_real_search(tmp_path: Path) -> None:
    # Arrange: pooled and local (in-process, no Ray), 2 lr x 2 local_steps, 1 round
    args = [*SMALL, "output.plots=false", "output.tensorboard=false",
            "compare.strategy=[pooled,local]", "compare.seed=[0,1]",
            "compare.lr=[0.01,0.1]", "compare.local_steps=[1,2]", f"compare.dir={tmp_path}"]
    # Act
    root = run_grid(args)
    # Assert: each search value is its run's final val metric; the best mean was chosen
    search = read_csv(root / "search.csv")
    assert len(search) == 8
    for row in search:
        final = json.loads((Path(row["run_dir"]) / "metrics.jsonl").read_text()
                           .splitlines()[-1])
        assert float(row["score"]) == pytest.approx(final["val/balanced_accuracy"])
    selected = {r["strategy"]: r for r in read_csv(root / "selected.csv")}
    for strategy, chosen in selected.items():
        mine = [r for r in search if r["strategy"] == strategy]
        best = max(mine, key=lambda r: float(r["score"]))  # one seed: the first maximum
        assert (chosen["train.lr"], chosen["train.local_steps"]) == (
            best["train.lr"], best["train.local_steps"])
    rows = read_csv(root / "compare.csv")
    assert [(r["strategy"], r["seed"]) for r in rows] == [
        ("pooled", "0"), ("pooled", "1"), ("local", "0"), ("local", "1")]
    for row in rows:
        assert row["train.lr"] == selected[row["strategy"]]["train.lr"]
        final = json.loads((Path(row["run_dir"]) / "results.json").read_text())["final"]
        assert float(row["balanced_accuracy"]) == pytest.approx(
            final["test/balanced_accuracy"])
