"""``python -m fedimg.privacy scenario=medical_dp [sweep.key=value ...] [key=value ...]``.

Runs a privacy/utility sweep (:mod:`fedimg.privacy.sweep`): one federated run per
(epsilon, seed), each audited by membership inference, then tables and plots.
Options: sweep.epsilons=[0.5,1,2,4,8,inf] sweep.seeds=[0,1] sweep.mode=dp_sgd|client_dp
sweep.dir=PATH sweep.audit_pool=500 sweep.lira_shadows=0 sweep.lira_epsilons=[inf,1]
sweep.inversion_steps=0 sweep.nonprivate=[train.lr=0.05]. Other key=value arguments
override the scenario.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from fedimg.errors import FedimgError


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    from fedimg.privacy.sweep import run_sweep
    from fedimg.reporting import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)  # noqa: T201 - CLI help text
        return 0
    setup_logging()
    try:
        run_sweep(args)
    except FedimgError as exc:
        logging.getLogger("fedimg").error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
