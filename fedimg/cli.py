"""The shared shape of fedimg's command-line entry points.

``python -m fedimg.simulate`` and ``python -m fedimg.audit`` both take Hydra-style
``key=value`` arguments, print their module docstring for ``-h``, and turn a
:class:`~fedimg.errors.FedimgError` into one logged line and its exit code.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fedimg.errors import FedimgError


def run_cli(run: Callable[[list[str]], Any], argv: Sequence[str] | None, *, doc: str) -> int:
    """Call ``run(args)``; return the process exit code (0, or the error's own)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(doc)  # noqa: T201 - CLI help text
        return 0
    try:
        run(args)
    except FedimgError as exc:
        logging.getLogger("fedimg").error("%s: %s", type(exc).__name__, exc)
        return exc.exit_code
    return 0
