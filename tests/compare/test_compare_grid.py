"""The comparison grid: cells, tables of mean ± std, per-site stats, and resuming."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

import fedimg.simulate
from fedimg.compare.grid import (
    cell_name,
    cell_row,
    parse_args,
    run_grid,
    site_stats,
    summarise,
)
from fedimg.errors import ConfigError
from manifests import ham_manifest

SMALL = ["scenario=medical", "data.dataset=synthetic", "data.source=synthetic",
         "model=mobilenet_v3_small", "weights=none", "data.image_size=16",
         "data.synthetic.train_size=64", "data.synthetic.test_size=16", "data.partitioner=iid",
         "clients=2", "rounds=1", "train.local_steps=2", "train.batch_size=8",
         "output.progress=false", "data.min_partition_size=4"]


def test_arguments_become_axes_and_bad_ones_are_named() -> None:
    grid, rest = parse_args(["compare.strategy=[pooled,fedavg]", "compare.fl.proximal_mu=0.1",
                             "compare.dir=/tmp/x", "rounds=3"])
    assert grid.axes == {"strategy": ["pooled", "fedavg"], "seed": [0, 1, 2],
                         "fl.proximal_mu": [0.1]}
    assert grid.dir == "/tmp/x" and rest == ["rounds=3"]
    assert len(grid.cells()) == 6
    assert cell_name(grid.cells()[0]) == "strategy-pooled_seed-0_fl.proximal_mu-0.1"
    with pytest.raises(ConfigError, match="compare.seed=\\[\\] is empty"):
        parse_args(["compare.seed=[]"])


def test_site_stats_and_the_summary_by_hand() -> None:
    final = {"test/site/a/auc": 0.9, "test/site/b/auc": 0.6, "test/site/c/auc": float("nan"),
             "test/auc": 0.8}
    assert site_stats(final, "auc") == (0.6, pytest.approx(0.3))
    rows = [{"strategy": "x", "seed": s, "auc": v} for s, v in ((0, 0.7), (1, 0.8), (2, 0.9))]
    [entry] = summarise(rows, ["strategy", "seed"])
    assert entry["seeds"] == 3 and entry["auc"] == pytest.approx(0.8)
    assert entry["auc_std"] == pytest.approx(statistics.stdev([0.7, 0.8, 0.9]))  # 0.1


def test_a_row_reports_the_personal_models_beside_the_global_one(tmp_path: Path) -> None:
    # Arrange: a run's results.json with global and personalised validation figures
    final = {"test/balanced_accuracy": 0.7, "test/site/a/balanced_accuracy": 0.6,
             "test/site/b/balanced_accuracy": 0.8, "fair/worst_accuracy": 0.5,
             "val/personal_accuracy": 0.9, "fair/worst_personal_accuracy": 0.75,
             "fair/worst_test_personal_balanced_accuracy": 0.55}
    (tmp_path / "results.json").write_text(json.dumps({"final": final,
                                                       "timing": {"total_s": 12.0}}))
    # Act
    row = cell_row({"strategy": "fedavg", "seed": 0}, tmp_path)
    # Assert
    assert row["balanced_accuracy"] == 0.7 and row["worst_site_balanced_accuracy"] == 0.6
    assert row["site_spread_balanced_accuracy"] == pytest.approx(0.2)
    assert (row["worst_client_val_accuracy"], row["personal_val_accuracy"],
            row["worst_client_personal_val_accuracy"], row["wall_s"]) == (0.5, 0.9, 0.75, 12.0)
    assert row["worst_site_personal_balanced_accuracy"] == 0.55


def test_a_grid_writes_its_tables_and_resumes_without_rerunning(tmp_path: Path,
                                                                monkeypatch) -> None:
    # Arrange
    args = [*SMALL, "compare.strategy=[pooled,local]", "compare.seed=[0,1]",
            f"compare.dir={tmp_path / 'grid'}"]
    # Act: the whole grid, then the same command again
    root = run_grid(args)
    calls: list[list[str]] = []
    monkeypatch.setattr(fedimg.simulate, "run", lambda argv: calls.append(argv) or {})
    run_grid(args)
    # Assert: 4 cells, each a run directory; the second invocation reran none of them
    assert calls == []
    with open(root / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["strategy"], r["seed"]) for r in rows] == [
        ("pooled", "0"), ("pooled", "1"), ("local", "0"), ("local", "1")]
    for row in rows:
        final = json.loads((Path(row["run_dir"]) / "results.json").read_text())["final"]
        assert float(row["auc"]) == pytest.approx(final["test/auc"])
    pooled = [float(r["balanced_accuracy"]) for r in rows if r["strategy"] == "pooled"]
    with open(root / "compare_summary.csv", newline="") as handle:
        summary = {r["strategy"]: r for r in csv.DictReader(handle)}
    assert float(summary["pooled"]["balanced_accuracy"]) == pytest.approx(
        statistics.fmean(pooled))
    assert summary["pooled"]["seeds"] == "2"
    assert "± " in (root / "compare.md").read_text()
    assert {p.name for p in root.glob("*.png")} >= {"compare.png", "curves.png"}


def test_a_bad_cell_is_refused_before_any_cell_runs(tmp_path: Path, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(fedimg.simulate, "run", lambda argv: calls.append(argv) or {})
    with pytest.raises(ConfigError, match="nosuch"):
        run_grid([*SMALL, "compare.strategy=[pooled,nosuch]", f"compare.dir={tmp_path}"])
    assert calls == []


@pytest.mark.slow
def test_a_manifest_and_the_folder_give_the_same_comparison(shared_data: Path,
                                                            tmp_path: Path) -> None:
    # Arrange: ham_sites as a folder, and as a CSV manifest with a site column
    folder, manifest = ham_manifest(shared_data, tmp_path / "ham.csv")
    common = ["scenario=medical", "model=mobilenet_v3_small", "weights=none",
              "data.image_size=16", "data.partitioner=natural", "data.natural_column=site",
              "clients=4", "rounds=1", "train.local_steps=2", "data.max_train_samples=400",
              "data.min_partition_size=8",
              "output.progress=false", "output.plots=false", "output.tensorboard=false",
              "compare.strategy=[pooled,local]", "compare.seed=[0]"]
    # Act
    by_folder = run_grid([*common, "data.dataset=folder", f"data.path={folder}",
                          f"compare.dir={tmp_path / 'folder'}"])
    by_manifest = run_grid([*common, "data.dataset=manifest", f"data.path={manifest}",
                            f"compare.dir={tmp_path / 'manifest'}"])
    # Assert: the same numbers in every metric column
    tables = []
    for root in (by_folder, by_manifest):
        with open(root / "compare.csv", newline="") as handle:
            tables.append([{k: v for k, v in r.items() if k not in ("run_dir", "wall_s")}
                           for r in csv.DictReader(handle)])
    assert tables[0] == tables[1] and len(tables[0]) == 2
    assert tables[0][1]["worst_site_balanced_accuracy"] != ""
