"""Run outputs: the run directory, plots, console progress and the summary table.

Plots read the files a run wrote (``metrics.jsonl``, ``partitions.json``), never
live objects, so they can be redrawn for any finished run.
"""

from fedimg.reporting.console import RoundProgress, setup_logging, summary_table
from fedimg.reporting.plots import plot_run
from fedimg.reporting.run_dir import RunRecorder, library_versions

__all__ = ["RoundProgress", "RunRecorder", "library_versions", "plot_run", "setup_logging",
           "summary_table"]
