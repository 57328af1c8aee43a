"""PNG figures of a comparison grid (:mod:`fedimg.compare.grid`).

* ``compare.png``: the final test metric of each group (strategy and any other axis
  but the seed), a bar at the mean with every seed as a dot;
* ``sites.png``: each group's final ``test/site/<name>/balanced_accuracy``, mean over
  seeds, one bar per site;
* ``curves.png``: the test metric per round of each group, mean over seeds, with the
  seeds' min..max band.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedimg.reporting.paths import RunPaths  # noqa: E402
from fedimg.reporting.run_dir import read_jsonl  # noqa: E402

METRIC = "balanced_accuracy"


def _groups(rows: list[dict[str, Any]], axes: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Rows by group label (every axis but the seed), in grid order."""
    keys = [a for a in axes if a != "seed"]
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(" ".join(str(row[k]) for k in keys) or "run", []).append(row)
    return out


def _final_metric(groups: dict[str, list[dict[str, Any]]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(groups)), 4))
    for x, (label, rows) in enumerate(groups.items()):
        values = [r[METRIC] for r in rows if r.get(METRIC) is not None]
        if values:
            ax.bar(x, float(np.mean(values)), color="#9ecae1")
            ax.scatter([x] * len(values), values, color="#08519c", zorder=3, s=14)
    ax.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right")
    ax.set_ylabel(f"final test {METRIC.replace('_', ' ')}")
    ax.set_title("mean over seeds (bar), each seed (dot)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _site_values(row: dict[str, Any]) -> dict[str, float]:
    final = read_jsonl(RunPaths(Path(row["run_dir"])).metrics)[-1]
    suffix = f"/{METRIC}"
    return {k[len("test/site/"):-len(suffix)]: v for k, v in final.items()
            if k.startswith("test/site/") and k.endswith(suffix) and v is not None}


def _sites(groups: dict[str, list[dict[str, Any]]], out: Path) -> bool:
    means = {label: {} for label in groups}
    for label, rows in groups.items():
        per_seed = [_site_values(r) for r in rows]
        for site in sorted(set().union(*per_seed)):
            means[label][site] = float(np.nanmean([s.get(site, math.nan) for s in per_seed]))
    sites = sorted(set().union(*(m.keys() for m in means.values())))
    if not sites:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(sites)), 4))
    width = 0.8 / len(groups)
    for i, (label, values) in enumerate(means.items()):
        ax.bar(np.arange(len(sites)) + i * width, [values.get(s, math.nan) for s in sites],
               width, label=label)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2, sites, rotation=20, ha="right")
    ax.set_ylabel(f"final test {METRIC.replace('_', ' ')} at the site")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _curves(groups: dict[str, list[dict[str, Any]]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, rows in groups.items():
        runs = [read_jsonl(RunPaths(Path(r["run_dir"])).metrics) for r in rows]
        length = min(len(r) for r in runs)
        ys = np.array([[rec.get(f"test/{METRIC}") or math.nan for rec in run[:length]]
                       for run in runs], dtype=float)
        xs = [rec["round"] for rec in runs[0][:length]]
        ax.plot(xs, np.nanmean(ys, axis=0), marker="o", markersize=3, label=label)
        ax.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {METRIC.replace('_', ' ')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_grid(root: Path, rows: list[dict[str, Any]], axes: list[str]) -> list[Path]:
    """Draw the grid's figures into ``root``; return their paths."""
    groups = _groups(rows, axes)
    written = [root / "compare.png", root / "curves.png"]
    _final_metric(groups, written[0])
    _curves(groups, written[1])
    if _sites(groups, root / "sites.png"):
        written.append(root / "sites.png")
    return written
