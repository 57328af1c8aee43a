"""The comparison grid: every cell an ordinary run, then tables of mean +- std over seeds.

``python -m fedimg.compare scenario=S compare.strategy=[pooled,local,fedavg]
compare.seed=[0,1,2] [compare.KEY=[a,b] ...] [key=value ...]`` runs ``S`` once per
cell of the product of the ``compare.*`` lists (any config key may be an axis, e.g.
``compare.fl.proximal_mu=[0.01,0.1]``). Each cell is a run directory under the grid's
folder (``compare.dir``); a cell whose ``results.json`` exists is reused, so an
interrupted grid resumes where it stopped. Every cell's config is checked before the
first one starts.

Per cell (``compare.csv``): the final pooled test metrics, the worst site and the
spread across sites of ``test/site/<name>/<metric>`` (where the test split names its
sites), the worst client's validation accuracy (``fair/worst_accuracy``: for a local
run, the worst site's own model), the personalised models' mean and worst validation
accuracy where a run has them (``fl.personal``: ``val/personal_accuracy``,
``fair/worst_personal_accuracy``), the worst site's balanced accuracy of its own
personalised model on its own test rows (``fair/worst_test_personal_balanced_accuracy``)
and the wall time. Per group of
cells that differ only in their seed (``compare.md``, ``compare_summary.csv``): mean
+- sample std and the number of seeds, the way cross-silo papers report (FLamby, Ogier
du Terrail et al. 2022).

With ``compare.lr``, ``compare.local_steps``, ``compare.server_lr`` or
``compare.ridge_lambda`` each strategy's recipe is first searched on ``compare.search_seeds`` and chosen on federated validation
only; the chosen setting alone runs on ``compare.seed`` and fills these tables (its
values in their own columns). See :mod:`fedimg.compare.search`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimg.compare.search import FAILED, SEARCH_AXES
from fedimg.config.codec import decode_search
from fedimg.config.schema import SearchConfig
from fedimg.errors import ConfigError, FedimgError, TrainingDiverged
from fedimg.reporting.paths import RunPaths
from fedimg.reporting.tables import markdown, parse_value, sample_std, write_csv

log = logging.getLogger(__name__)

PREFIX = "compare."
OPTIONS = ("dir",)
SEARCH_OPTIONS = (*SEARCH_AXES, "search_seeds", "select_metric")  # a SearchConfig's fields
METRICS = ("balanced_accuracy", "auc", "accuracy")
DEFAULT_AXES = {"strategy": ["pooled", "local", "fedavg"], "seed": [0, 1, 2]}


@dataclass
class GridConfig:
    """The axes of a grid (``compare.KEY=[...]``) and where it is written."""

    axes: dict[str, list[Any]] = field(default_factory=lambda: dict(DEFAULT_AXES))
    dir: str = ""  # default runs/compare/<scenario>-<time>
    search: SearchConfig = field(default_factory=SearchConfig)  # empty axes: no search

    def cells(self) -> list[dict[str, Any]]:
        """Every combination of the axes' values, the first axis slowest."""
        keys = list(self.axes)
        return [dict(zip(keys, values)) for values in itertools.product(*self.axes.values())]


def parse_args(argv: Sequence[str]) -> tuple[GridConfig, list[str]]:
    """Split ``compare.*`` arguments from the scenario's own ``key=value`` arguments."""
    grid, rest, search = GridConfig(), [], {}
    for arg in argv:
        if not arg.startswith(PREFIX):
            rest.append(arg)
            continue
        key, sep, text = arg[len(PREFIX):].partition("=")
        if not sep or not key:
            raise ConfigError(f"'{arg}' is not compare.KEY=VALUE. Fix: e.g. "
                              "compare.strategy=[pooled,local,fedavg] compare.seed=[0,1,2]")
        if key in OPTIONS:
            setattr(grid, key, text)
            continue
        value = parse_value(text)
        if key in SEARCH_OPTIONS:
            search[key] = value if key == "select_metric" or isinstance(value, list) else [value]
            continue
        grid.axes[key] = value if isinstance(value, list) else [value]
        if not grid.axes[key]:
            raise ConfigError(f"compare.{key}=[] is empty. Fix: give it at least one value")
    grid.search = decode_search(search)
    return grid, rest


def cell_name(cell: dict[str, Any]) -> str:
    """``strategy-fedavg_seed-0``: the cell's folder name (``/`` and ``=`` made safe)."""
    parts = [f"{k}-{v}" for k, v in cell.items()]
    return "_".join(parts).replace("/", "-").replace("=", "-").replace(" ", "")


def cell_args(cell: dict[str, Any], run_dir: Path) -> list[str]:
    """The simulation arguments of one cell."""
    return [*(f"{k}={v}" for k, v in cell.items()), f"hydra.run.dir={run_dir}"]


def site_stats(final: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    """Worst value and spread (max - min) of ``test/site/<name>/<metric>``, or Nones."""
    values = [v for k, v in final.items() if k.startswith("test/site/")
              and k.endswith(f"/{metric}") and isinstance(v, float) and not math.isnan(v)]
    return (min(values), max(values) - min(values)) if values else (None, None)


def cell_row(cell: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One line of compare.csv, read from the cell's results.json."""
    results = json.loads(RunPaths(run_dir).results.read_text())
    final = results.get("final", {})
    row: dict[str, Any] = dict(cell)
    for metric in METRICS:
        row[metric] = final.get(f"test/{metric}")
    for metric in METRICS[:2]:
        row[f"worst_site_{metric}"], row[f"site_spread_{metric}"] = site_stats(final, metric)
    row["worst_client_val_accuracy"] = final.get("fair/worst_accuracy")
    # fl.personal (or fl.personalize_steps): each client's own model on its validation split
    row["personal_val_accuracy"] = final.get("val/personal_accuracy")
    row["worst_client_personal_val_accuracy"] = final.get("fair/worst_personal_accuracy")
    # ... and on each site's own test rows (a natural split): the worst site's
    row["worst_site_personal_balanced_accuracy"] = final.get(
        "fair/worst_test_personal_balanced_accuracy")
    row["wall_s"] = results.get("timing", {}).get("total_s")
    row["run_dir"] = str(run_dir)
    return row


VALUES = (*METRICS, *(f"{p}_{m}" for m in METRICS[:2] for p in ("worst_site", "site_spread")),
          "worst_client_val_accuracy", "personal_val_accuracy",
          "worst_client_personal_val_accuracy", "worst_site_personal_balanced_accuracy",
          "wall_s")


def summarise(rows: list[dict[str, Any]], axes: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds for each group of the other axes, in grid order."""
    keys = [a for a in axes if a != "seed"]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for values, group in groups.items():
        entry: dict[str, Any] = {**dict(zip(keys, values)), "seeds": len(group)}
        for col in VALUES:
            found = [float(r[col]) for r in group if r.get(col) is not None]
            entry[col] = statistics.fmean(found) if found else None
            entry[f"{col}_std"] = sample_std(found) if found else None
        out.append(entry)
    return out


def _pm(entry: dict[str, Any], col: str) -> str:
    if entry.get(col) is None:
        return "-"
    return f"{entry[col]:.3f} ± {entry[f'{col}_std']:.3f}"


def write_tables(root: Path, rows: list[dict[str, Any]], axes: Sequence[str]) -> None:
    """compare.csv (every cell), compare_summary.csv and compare.md (mean ± std)."""
    summary = summarise(rows, axes)
    write_csv(root / "compare.csv", rows)
    write_csv(root / "compare_summary.csv", summary)
    keys = [a for a in axes if a != "seed"]
    shown = [{**{k: e[k] for k in keys}, "seeds": e["seeds"],
              **{c: _pm(e, c) for c in VALUES}} for e in summary]
    (root / "compare.md").write_text(
        "# Comparison\n\nFinal round, test split: pooled metrics, then the worst site and "
        "the spread across sites (`test/site/*`). Mean ± sample std over seeds.\n\n"
        + markdown(shown, [*keys, "seeds", *VALUES]) + "\n\n## Every run\n\n"
        + markdown(rows, [*axes, *VALUES]) + "\n")


def run_grid(argv: Sequence[str]) -> Path:
    """Run (or resume) the grid described by ``argv``; return its folder."""
    from fedimg.compare.plots import plot_grid
    from fedimg.config.compose import split_argv
    from fedimg.grids import grid_root
    from fedimg.reporting import setup_logging

    setup_logging()
    grid, rest = parse_args(argv)
    scenario, overrides = split_argv(rest)
    root = grid_root(grid.dir, kind="compare", scenario=scenario)
    cells = CellRunner(scenario, list(overrides), root)
    rows = (searched_grid(grid, cells) if any(getattr(grid.search, k) for k in SEARCH_AXES)
            else plain_grid(grid, cells))
    plot_grid(root, rows, list(grid.axes))
    log.info("comparison\n%s", (root / "compare.md").read_text())
    return root


@dataclass
class CellRunner:
    """Checks and runs cells of one grid: the scenario, the shared overrides, the folder."""

    scenario: str
    overrides: list[str]
    root: Path

    def check(self, cells: Sequence[dict[str, Any]]) -> None:
        """Compose and check every cell's config before any runs."""
        from fedimg.grids import check_cells

        check_cells(self.scenario, self.overrides,
                    [cell_args(c, self.root / "check") for c in cells])

    def run(self, cell: dict[str, Any], run_dir: Path, *, label: str) -> Path:
        """Run one cell into ``run_dir``, or reuse it if it finished before."""
        from fedimg.grids import run_cell

        self.root.mkdir(parents=True, exist_ok=True)
        log.info("%s %s -> %s", label, cell, run_dir)
        if run_cell(self.scenario, self.overrides, cell_args(cell, run_dir), run_dir):
            log.info("%s had finished: reused", label)
        return run_dir

    def try_run(self, cell: dict[str, Any], run_dir: Path, *, label: str) -> Path:
        """A search cell: a failure (a diverged point) is recorded in the cell, not raised.

        Like a failed trial of Optuna or Ray Tune, it scores nothing and the search goes
        on; a rerun reuses the failure (delete the folder to retry).
        """
        if (run_dir / FAILED).is_file():
            log.warning("%s %s failed before: reused as failed", label, run_dir)
            return run_dir
        try:
            return self.run(cell, run_dir, label=label)
        except Exception as exc:  # noqa: BLE001 - any failure of one point, kept in its folder
            if isinstance(exc, FedimgError) and not isinstance(exc, TrainingDiverged):
                raise  # a data, model or config error fails every point alike: stop
            log.exception("%s %s failed; it scores nothing", label, cell)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FAILED).write_text(f"{type(exc).__name__}: {exc}\n")
            return run_dir


def plain_grid(grid: GridConfig, cells: CellRunner) -> list[dict[str, Any]]:
    """Every cell of the grid, one run each (no search)."""
    todo = grid.cells()
    cells.check(todo)
    rows = []
    for i, cell in enumerate(todo, 1):
        run_dir = cells.run(cell, cells.root / cell_name(cell), label=f"cell {i}/{len(todo)}")
        rows.append(cell_row(cell, run_dir))
        write_tables(cells.root, rows, list(grid.axes))
    return rows


def searched_grid(grid: GridConfig, cells: CellRunner) -> list[dict[str, Any]]:
    """Search each group's recipe on validation, then report its chosen point's runs."""
    from fedimg.compare.search import check_axes, plan_groups, report_cells, run_searches
    from fedimg.compare.search import searched_keys
    from fedimg.config.checks import check_search
    from fedimg.resolve import compose_and_check

    search, root = grid.search, cells.root
    base = compose_and_check(cells.scenario, [*cells.overrides,
                                              *cell_args(grid.cells()[0], root / "check")])
    metric = check_search(search, output_metric=base.output.select_metric)
    check_axes(list(grid.axes), search)
    groups = plan_groups(grid.cells(), search)
    cells.check([c for g in groups if g.searched for c in g.search_cells(search.search_seeds)])
    selected = run_searches(groups, root=root, search=search, metric=metric,
                            run=lambda cell: cells.try_run(cell, root / "search" /
                                                           cell_name(cell), label="search cell"))
    report = [item for g in groups for item in report_cells(g, search.search_seeds)]
    if set(search.search_seeds) & set(grid.axes["seed"]):
        log.info("a reporting seed that is also a search seed reuses the chosen point's "
                 "search run; for test figures from seeds the search never saw, give "
                 "disjoint seeds (e.g. compare.search_seeds=[100])")
    cells.check([cell for cell, reused in report if not reused])
    keys, rows = searched_keys(search), []
    for i, (cell, reused) in enumerate(report, 1):
        run_dir = (root / "search" if reused else root) / cell_name(cell)
        cells.run(cell, run_dir, label=f"cell {i}/{len(report)}")
        rows.append(cell_row({**cell, **{k: cell.get(k) for k in keys}}, run_dir))
        write_tables(root, rows, [*grid.axes, *keys])
    append_search_table(root, selected, metric=metric)
    return rows


def append_search_table(root: Path, selected: list[dict[str, Any]], *, metric: str) -> None:
    """compare.md's last section: the setting each group ran with, and how it was chosen."""
    with open(root / "compare.md", "a") as handle:
        handle.write(f"\n## Recipe search\n\nEach group's setting, chosen on {metric} (mean "
                     "over the search seeds, final round; federated validation only) before "
                     "the runs above (search.csv: every point).\n\n"
                     + markdown(selected, list(selected[0])) + "\n")
