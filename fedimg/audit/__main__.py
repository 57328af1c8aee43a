"""``python -m fedimg.audit scenario=medical_dp [sweep.key=value ...] [key=value ...]``.

Runs a privacy/utility sweep (:mod:`fedimg.audit.sweep`): one federated run per
(epsilon, seed), each audited by membership inference, then tables and plots.
Options: sweep.epsilons=[0.5,1,2,4,8,inf] sweep.seeds=[0,1] sweep.mode=dp_sgd|client_dp
sweep.dir=PATH sweep.audit_pool=500 sweep.lira_shadows=0 sweep.lira_epsilons=[inf,1]
sweep.inversion_steps=0 sweep.nonprivate=[train.lr=0.05]. Other key=value arguments
override the scenario.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fedimg.cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    from fedimg.audit.sweep import run_sweep

    return run_cli(run_sweep, argv, doc=__doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
