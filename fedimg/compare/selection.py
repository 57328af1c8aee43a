"""Choosing a recipe on federated validation only: the half of a search that reads runs.

A point of a recipe search (e.g. ``train.lr=0.01 train.local_steps=5``) is scored by
the mean, over the search seeds, of its final round's federated validation metric
(``compare.select_metric``, default ``output.select_metric``); the best point wins,
and of equal scores the earlier point in grid order. Choosing hyper-parameters on the
test split makes the test figure reported afterwards optimistic (Cawley & Talbot
2010, "On Over-fitting in Model Selection and Subsequent Selection Bias in
Performance Evaluation", JMLR 11), so federated tuning guides tune on held-out
validation clients or splits (Wang et al. 2021, "A Field Guide to Federated
Optimization"). Here the rule is enforced by construction: a run is read only
through :func:`validation_view`, which keeps the ``val/`` keys of a round and drops
everything else (``test/`` above all), so no test metric can reach
:func:`select_point`.

Why the final round, not each run's best round: the reporting runs report their
final round (``compare.csv``), so the search scores what will be reported. A best
round would add a second, hidden selection (of the round) on the same numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedimg.errors import ConfigError
from fedimg.reporting.paths import RunPaths
from fedimg.reporting.run_dir import read_jsonl

VAL_PREFIX = "val/"


def validation_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """The federated validation (``val/``) keys of one round's record; nothing else."""
    return {k: v for k, v in record.items() if k.startswith(VAL_PREFIX)}


def final_validation(run_dir: Path) -> dict[str, Any]:
    """The validation view of a run's final round (the last line of ``metrics.jsonl``).

    Empty for a run that did not finish (no ``results.json``): its last line is not
    the final round.
    """
    paths = RunPaths(run_dir)
    records = read_jsonl(paths.metrics) if paths.results.is_file() else []
    return validation_view(records[-1]) if records else {}


def metric_value(view: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of a validation view; None when it is missing, null or NaN."""
    if not metric.startswith(VAL_PREFIX):
        raise ConfigError(f"select metric '{metric}' is not a val/ metric: a recipe is "
                          "chosen on federated validation only. Fix: e.g. val/balanced_accuracy")
    value = view.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def point_score(values: Sequence[float | None]) -> float | None:
    """Mean over the search seeds; None if a seed has no value (such a point never wins)."""
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(v for v in values if v is not None)


def lower_is_better(metric: str) -> bool:
    """A loss (``val/loss``) is minimised; every other metric is maximised."""
    return metric.rsplit("/", 1)[-1].endswith("loss")


def select_point(scores: Sequence[float | None], *, metric: str) -> int:
    """Index of the best score, the first of ties; a None score never wins."""
    scored = [(i, s) for i, s in enumerate(scores) if s is not None]
    if not scored:
        raise ConfigError(f"no search point has a final-round {metric} on every search seed "
                          "(failed runs keep their error in search_failed.txt), so none can "
                          "be chosen. Fix: keep federated evaluation on (data.val_fraction > "
                          "0), pick another compare.select_metric, or lower compare.lr")
    sign = -1.0 if lower_is_better(metric) else 1.0
    return max(scored, key=lambda item: sign * item[1])[0]  # max keeps the first of ties


def score_points(runs: Sequence[Sequence[Path]], *, metric: str
                 ) -> tuple[int, list[list[float | None]]]:
    """Choose among points, each given as its runs (one per search seed).

    Returns the chosen point's index and every run's validation value, per point.
    Each run is read through :func:`final_validation`: only ``val/`` keys get here.
    """
    values = [[metric_value(final_validation(d), metric) for d in point] for point in runs]
    return select_point([point_score(v) for v in values], metric=metric), values
