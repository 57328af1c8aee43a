"""``python -m fedimg.simulate scenario=medical [key=value ...]``: a federated simulation.

compose config -> validate -> prepare data and partitions -> run on the Ray engine
-> save results and plots -> print the summary table. Any user error (unknown
scenario/model/dataset/strategy, impossible value, missing data) stops the run
before round 1 with a one-line message and the error's exit code.

``python -m fedimg.simulate resume=<run_dir> [rounds=N]`` continues a run that was
killed, from the last round it completed (``checkpoints/last.pt``), with the
config it was started with; with the same seed it ends with the same metrics as a
run that was never interrupted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedimg.cli import run_cli
from fedimg.errors import RunStopped
from fedimg.reporting import plot_run, setup_logging, summary_table

if TYPE_CHECKING:
    from fedimg.build import PreparedRun

log = logging.getLogger("fedimg.simulate")


def run(argv: Sequence[str]) -> dict:
    """Run a simulation from command-line style arguments; return results.json's content."""
    from fedimg.build import prepare_run

    from fedimg.serverapp.checkpoint import config_from_argv

    setup_logging()
    cfg, resume = config_from_argv(argv)
    run_dir = Path(str(cfg.output.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    log.info("scenario '%s' -> %s", cfg.name, cfg.output.run_dir)
    prepared = prepare_run(cfg, resume=resume)
    try:
        results = _run(prepared, resume=resume)
    except RunStopped:
        if cfg.output.plots:  # the rounds that did run are worth a look
            plot_run(prepared.recorder.run_dir)
        raise
    if cfg.output.plots:
        plot_run(prepared.recorder.run_dir)
    log.info("summary\n%s", summary_table(prepared.recorder.read_rounds(), results))
    return results


def _run(prepared: PreparedRun, *, resume: bool) -> dict:
    """A federation on the Ray engine, or a baseline (``strategy=pooled|local``) here."""
    from fedimg.serverapp.strategies import STRATEGIES

    if not STRATEGIES.get(prepared.cfg.strategy).baseline:
        from fedimg.simulation.engine import simulate

        return simulate(prepared)
    from fedimg.baselines import check_baseline, run_baseline

    check_baseline(prepared, resume=resume)
    return run_baseline(prepared)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    return run_cli(run, argv, doc=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
