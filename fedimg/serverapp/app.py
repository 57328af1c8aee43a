"""The Flower ServerApp: a thin ``main`` over :func:`fedimg.serverapp.run.run_federation`.

Two ways in:

* ``python -m fedimg.simulate ...`` composes and validates the config, prepares
  the run, then builds a ServerApp with :func:`make_server_app` (a closure over
  the prepared run, since ``run_simulation`` leaves ``context.run_config`` empty).
* ``flwr run .`` loads the module-level ``app``; its ``main`` composes the config
  from the run config keys ``scenario`` and ``overrides`` (see pyproject.toml).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedimg.build import PreparedRun, prepare_run
from fedimg.serverapp.checkpoint import config_from_argv
from fedimg.serverapp.run import run_federation
from fedimg.reporting import plot_run, setup_logging


def make_server_app(prepared: PreparedRun,
                    on_results: Callable[[dict[str, Any]], None]) -> ServerApp:
    """A ServerApp that runs ``prepared`` and passes its results to ``on_results``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        on_results(run_federation(grid, prepared))

    return server_app


app = ServerApp()


@app.main()
def flwr_run_main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .`` and deployed SuperLinks."""
    scenario = str(context.run_config.get("scenario", "medical"))
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    if not any(o.startswith("resume=") for o in overrides):  # fedimg-server run resume=
        overrides = [f"scenario={scenario}", *overrides]
    cfg, resume = config_from_argv(overrides)
    prepared = prepare_run(cfg, resume=resume)
    setup_logging(prepared.recorder.run_dir)
    run_federation(grid, prepared)
    if cfg.output.plots:
        plot_run(prepared.recorder.run_dir)
