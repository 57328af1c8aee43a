"""Many runs from one command: the steps the privacy sweep and the comparison grid share.

A grid is a folder of ordinary run directories, one per cell. Every cell's config is
composed and checked before the first cell runs, so a typo in the last cell costs no
hours; a cell whose ``results.json`` exists is reused, so an interrupted grid resumes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from fedimg.reporting.paths import RunPaths


def grid_root(given: str, *, kind: str, scenario: str) -> Path:
    """``given``, else ``runs/<kind>/<scenario>-<time>``, absolute."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(given or f"runs/{kind}/{Path(scenario).stem}-{stamp}").resolve()


def check_cells(scenario: str, overrides: Sequence[str],
                cells: Sequence[Sequence[str]]) -> None:
    """Compose and check every cell's config (its own arguments after ``overrides``)."""
    from fedimg.resolve import compose_and_check

    for args in cells:
        compose_and_check(scenario, [*overrides, *args])


def run_cell(scenario: str, overrides: Sequence[str], args: Sequence[str],
             run_dir: Path) -> bool:
    """Run one cell into ``run_dir`` unless it finished before; True if it was reused."""
    from fedimg.simulate import run

    if RunPaths(run_dir).results.is_file():
        return True
    run([f"scenario={scenario}", *overrides, *args])
    return False
