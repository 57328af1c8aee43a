"""A recipe search per strategy before the comparison: chosen on validation, reported on test.

``compare.lr=[...]``, ``compare.local_steps=[...]``, ``compare.server_lr=[...]`` and
``compare.ridge_lambda=[...]`` (a :class:`~fedimg.config.schema.SearchConfig`) set
``train.lr``, ``train.local_steps``, ``fl.server_lr`` and ``fl.ridge_lambda`` (the
closed-form head's penalty: it matters only with ``fl.head_init=ridge``). For each group of the grid (a strategy, and any other axis but
the seed) the search:

1. runs every point of the group's grid, the product of the axes that apply to it
   (``fl.server_lr`` only where the strategy's registry entry has ``reads_server_lr``;
   order: lr slowest, then local_steps, then server_lr), on each of
   ``compare.search_seeds``, under ``<grid>/search/`` (finished runs are reused);
2. scores each point on its final round's federated validation metric, mean over the
   search seeds, and chooses the best (:mod:`.selection`: no test metric is read);
3. runs the chosen point on the reporting seeds ``compare.seed``. These runs alone give
   the test figures of ``compare.csv``; a reporting seed that is also a search seed
   reuses that search run (the same config).

A group with a single point (no axis applies, or one value each) is not searched. A
search run that fails (a learning rate that diverges) scores nothing and the search
goes on; its folder keeps the error in ``search_failed.txt``.
Writes ``search.csv`` (every search run's validation value) and ``selected.csv``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimg.compare.selection import point_score, score_points
from fedimg.config.schema import SearchConfig
from fedimg.errors import ConfigError
from fedimg.reporting.tables import write_csv

log = logging.getLogger(__name__)

SEARCH_AXES = {"lr": "train.lr", "local_steps": "train.local_steps",
               "server_lr": "fl.server_lr",
               "ridge_lambda": "fl.ridge_lambda"}  # compare.<name> -> the config key it sets
SERVER_LR = SEARCH_AXES["server_lr"]
FAILED = "search_failed.txt"  # in a search cell whose run raised (e.g. diverged)


def searched_keys(search: SearchConfig) -> list[str]:
    """The config keys the search sets, in grid order (``train.lr`` first)."""
    return [key for name, key in SEARCH_AXES.items() if getattr(search, name)]


def search_points(search: SearchConfig, *, reads_server_lr: bool) -> list[dict[str, Any]]:
    """One group's grid: the product of the axes that apply, the first axis slowest."""
    axes = {key: getattr(search, name) for name, key in SEARCH_AXES.items()
            if getattr(search, name) and (key != SERVER_LR or reads_server_lr)}
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def at_seed(cell: dict[str, Any], seed: int) -> dict[str, Any]:
    """``cell`` with its seed replaced (its key keeps its place, so names stay aligned)."""
    return {k: (seed if k == "seed" else v) for k, v in cell.items()}


@dataclass
class Group:
    """The cells of a grid that differ only in their seed, and the group's search."""

    cells: list[dict[str, Any]]
    points: list[dict[str, Any]]
    keys: list[str]  # every key the search sets (a group's points may lack some)
    chosen: int = 0
    values: list[list[float | None]] = field(default_factory=list)

    @property
    def label(self) -> dict[str, Any]:
        """The group's axes but the seed, e.g. ``{"strategy": "fedadam"}``."""
        return {k: v for k, v in self.cells[0].items() if k != "seed"}

    @property
    def searched(self) -> bool:
        """More than one point: a group with one point runs it without a search."""
        return len(self.points) > 1

    def search_cells(self, seeds: Sequence[int]) -> list[dict[str, Any]]:
        """Every (point, search seed) cell, point by point."""
        return [{**at_seed(self.cells[0], s), **p} for p in self.points for s in seeds]


def plan_groups(cells: Sequence[dict[str, Any]], search: SearchConfig) -> list[Group]:
    """The grid's groups in grid order, each with its points (registry facts decide)."""
    from fedimg.serverapp.strategies import STRATEGIES

    groups: dict[tuple, Group] = {}
    for cell in cells:
        label = tuple((k, v) for k, v in cell.items() if k != "seed")
        if label not in groups:
            spec = STRATEGIES.get(str(cell["strategy"]))
            points = search_points(search, reads_server_lr=spec.reads_server_lr)
            groups[label] = Group([], points, searched_keys(search))
        groups[label].cells.append(cell)
    if search.server_lr and not any(SERVER_LR in g.points[0] for g in groups.values()):
        readers = [n for n in STRATEGIES.names() if STRATEGIES.get(n).reads_server_lr]
        raise ConfigError(f"compare.server_lr={search.server_lr} applies to no strategy of "
                          "the grid: only those with a server step read fl.server_lr "
                          f"({', '.join(readers)}). Fix: add one to compare.strategy, or "
                          "drop compare.server_lr")
    return list(groups.values())


def check_axes(axes: Sequence[str], search: SearchConfig) -> None:
    """A key may be a plain axis (every value reported) or searched, not both."""
    for key in searched_keys(search):
        name = next(n for n, k in SEARCH_AXES.items() if k == key)
        if key in axes:
            raise ConfigError(f"compare.{key} and compare.{name} both set {key}. Fix: keep "
                              f"compare.{name} (chosen on validation) or compare.{key} "
                              "(every value reported), not both")


def search_row(group: Group, index: int, *, seed: int, run_dir: Path,
               metric: str, value: float | None) -> dict[str, Any]:
    """One line of search.csv: a point at one search seed and its validation value."""
    point = {k: group.points[index].get(k) for k in group.keys}  # None: not this group's
    return {**group.label, "point": index, **point, "search_seed": seed,
            "select_metric": metric, "score": value,
            "status": "failed" if (run_dir / FAILED).is_file() else "ok",
            "run_dir": str(run_dir)}


def selected_row(group: Group, *, metric: str, seeds: Sequence[int]) -> dict[str, Any]:
    """One line of selected.csv: the chosen setting and its mean validation score."""
    point = group.points[group.chosen]
    score = point_score(group.values[group.chosen]) if group.searched else None
    return {**group.label, **{k: point.get(k) for k in group.keys}, "points": len(group.points),
            "search_seeds": " ".join(map(str, seeds)) if group.searched else "",
            "select_metric": metric, "score": score}


def run_searches(groups: Sequence[Group], *, root: Path, search: SearchConfig, metric: str,
                 run: Callable[[dict[str, Any]], Path]) -> list[dict[str, Any]]:
    """Run each searched group's points on the search seeds, then choose its point.

    ``run(cell)`` runs (or reuses) one search cell and returns its run directory.
    Writes search.csv (after each group) and selected.csv under ``root``; returns the
    rows of selected.csv.
    """
    seeds, rows = search.search_seeds, []
    for group in (g for g in groups if g.searched):
        dirs = [[run({**at_seed(group.cells[0], s), **p}) for s in seeds] for p in group.points]
        group.chosen, group.values = score_points(dirs, metric=metric)
        rows += [search_row(group, i, seed=s, run_dir=d, metric=metric, value=v)
                 for i in range(len(group.points))
                 for s, d, v in zip(seeds, dirs[i], group.values[i])]
        write_csv(root / "search.csv", rows)
    selected = [selected_row(g, metric=metric, seeds=seeds) for g in groups]
    write_csv(root / "selected.csv", selected)
    for group, row in zip(groups, selected):
        name = " ".join(f"{k}={v}" for k, v in group.label.items())
        log.info("search %s: %s", name, summary_line(group, row, metric=metric))
    return selected


def summary_line(group: Group, row: dict[str, Any], *, metric: str) -> str:
    """``selected train.lr=0.01 of 4 points on val/balanced_accuracy 0.7120 (...)``."""
    setting = " ".join(f"{k}={v}" for k, v in group.points[group.chosen].items()) or "defaults"
    if not group.searched:
        return f"{setting} (one point: not searched)"
    score = "n/a" if row["score"] is None else f"{row['score']:.4f}"
    return (f"selected {setting} of {len(group.points)} points on {metric} {score} "
            f"(mean over search seeds {row['search_seeds']}; no test metric read)")


def report_cells(group: Group, search_seeds: Sequence[int]
                 ) -> list[tuple[dict[str, Any], bool]]:
    """The group's reporting cells at its chosen point; True where a search run is reused."""
    point = group.points[group.chosen]
    return [({**cell, **point}, group.searched and cell["seed"] in search_seeds)
            for cell in group.cells]
