"""``python -m fedimg.compare scenario=S [compare.KEY=[a,b] ...] [key=value ...]``.

Runs a grid of ordinary runs, by default ``compare.strategy=[pooled,local,fedavg]``
times ``compare.seed=[0,1,2]``; any config key can be another axis
(``compare.fl.proximal_mu=[0.01,0.1]``). ``compare.dir=PATH`` names its folder; a
finished cell there is reused, so a grid resumes. It writes compare.csv,
compare_summary.csv, compare.md (mean ± std over seeds, worst site and spread) and
compare.png, sites.png and curves.png (see :mod:`fedimg.compare.grid`).

``compare.lr=[...]``, ``compare.local_steps=[...]``, ``compare.server_lr=[...]`` and
``compare.ridge_lambda=[...]`` (with ``fl.head_init=ridge``) first search each strategy's recipe on ``compare.search_seeds`` (default ``[0]``),
chosen on the final round's federated validation metric ``compare.select_metric``
(default ``output.select_metric``; never a test metric), then report the chosen
setting's runs on ``compare.seed``; search.csv and selected.csv show the search
(see :mod:`fedimg.compare.search`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedimg.cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    from fedimg.compare.grid import run_grid

    return run_cli(run_grid, argv, doc=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
