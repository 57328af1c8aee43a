"""A simulated client's device in one round: ``hetero.*`` (:mod:`fedimg.simulation.fleet`).

:func:`device_conditions` draws whether the client is online and whether it drops
out (raising :class:`~fedimg.simulation.fleet.DeviceAbsent`); :func:`pace` reports the
device's round time and, under ``hetero.clock=real``, takes that long. Used by the
train handler for a lone client and by :mod:`fedimg.clientapp.cohort` per member.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any

from fedimg.clientapp.environment import TaskEnvironment
from fedimg.simulation import fleet


def device_conditions(env: TaskEnvironment, pid: int, server_round: int,
                      attempt: int) -> fleet.ClientConditions | None:
    """This round's simulated device (``hetero.*``): offline and dropping clients raise.

    A dropping client really runs the local steps it completes before it dies, and
    sends nothing: the server sees a failed client, never an update.
    """
    h = env.cfg.hetero
    if not fleet.enabled(h):
        return None
    cond = fleet.conditions(env.cfg, server_round, pid, attempt)
    if not cond.online:
        raise fleet.ClientOffline(f"client {pid} is offline in round {server_round} "
                                  f"(hetero.availability={h.availability})")
    if cond.drop_after is not None:
        total = env.local_steps(pid)
        done = fleet.steps_before_drop(total, cond.drop_after)
        if done:
            env.train(pid, server_round=server_round, steps=done)
        raise fleet.ClientDropped(f"client {pid} dropped out of round {server_round} after "
                                  f"{done} of its {total} local steps "
                                  f"(hetero.dropout={h.dropout})")
    return cond


def pace(env: TaskEnvironment, cond: fleet.ClientConditions, *,
         metrics: MutableMapping[str, Any], bytes_down: int, bytes_up: int,
         compute_s: float, steps: int) -> None:
    """Add the device's round time to a reply's ``metrics``; under ``hetero.clock=real``,
    take that long. ``bytes_down``/``bytes_up``: the model received, the update sent."""
    h = env.cfg.hetero
    device_s = fleet.device_seconds(h, cond, compute_s=compute_s, steps=steps,
                                    bytes_down=bytes_down, bytes_up=bytes_up)
    metrics["fleet/speed"] = cond.speed
    metrics["fleet/compute_s"] = compute_s  # measured on this host
    metrics["fleet/device_s"] = device_s
    time.sleep(fleet.real_delay(h, device_s=device_s, compute_s=compute_s))
