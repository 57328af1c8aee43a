"""Tables of many runs: argument lists, mean and spread over seeds, markdown.

Shared by the privacy sweep (:mod:`fedimg.audit.sweep`) and the comparison grid
(:mod:`fedimg.compare`).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_value(text: str) -> Any:
    """``[a,b]`` -> a list, numbers -> int/float, anything else -> the stripped string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [parse_value(x) for x in text[1:-1].split(",") if x.strip()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def sample_std(values: list[float]) -> float:
    """Sample standard deviation; 0 for one value or equal values (inf included)."""
    if len(values) < 2 or len(set(values)) == 1:
        return 0.0
    return statistics.stdev(values) if all(map(math.isfinite, values)) else math.nan


def fmt(value: Any) -> str:
    """A table cell: ``-`` for None, 4 significant digits, ``inf``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV, the columns of the first row (then any others, in order seen)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
