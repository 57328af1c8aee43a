"""Injected client faults (chaos testing): ``faults.raise_at`` and ``faults.kill_at``.

Each entry is a ``[round, client]`` pair: in that training round that client raises
an exception, or kills its own worker process with SIGKILL, as the OOM killer would.
The fault tolerance they exercise is the round loop's (:mod:`fedimg.serverapp.loop`).
"""

from __future__ import annotations

import logging
import os
import signal

from fedimg.config import FedimgConfig

log = logging.getLogger(__name__)


def inject_fault(cfg: FedimgConfig, server_round: int, partition_id: int) -> None:
    """Raise or die now if ``faults`` schedules it for this client and round."""
    here = [server_round, partition_id]
    if here in [list(e) for e in cfg.faults.raise_at]:
        raise RuntimeError(f"injected fault: client {partition_id} raises in round "
                           f"{server_round} (faults.raise_at)")
    if here in [list(e) for e in cfg.faults.kill_at]:
        log.warning("injected fault: client %d kills its worker (pid %d) in round %d",
                    partition_id, os.getpid(), server_round)
        os.kill(os.getpid(), signal.SIGKILL)
