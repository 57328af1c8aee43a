"""Device and network heterogeneity of simulated clients: who is online, who drops, who is late.

A camera fleet is not a set of identical, always-on workers. This module draws,
for one client in one round, the conditions ``hetero.*`` describes
(:class:`~fedimg.config.HeterogeneityConfig`), and turns its measured compute into
the time a real device would have needed:

* **availability**: a sampled client is online with probability ``availability``
  (the partial, unreliable participation of cross-device FL, Kairouz et al. 2021,
  "Advances and Open Problems in Federated Learning", sec. 1.1);
* **mid-round dropout**: an online client dies after a uniform fraction of its
  local steps, with probability ``dropout`` (it really runs those steps);
* **heterogeneous compute**: a fixed speed factor per client, LogNormal(0, sigma)
  (how many times slower than this host), or an explicit list;
* **links**: ``downlink_mbps`` / ``uplink_mbps`` turn the bytes of the global model
  and of the update into transfer seconds;
* **stragglers**: with ``deadline_s`` a reply whose device time exceeds it is not
  aggregated, as a server with a round deadline would drop it (Bonawitz et al.
  2019, "Towards Federated Learning at Scale: System Design").

Draws are seeded by (run seed, round, client): a run and its resume repeat them,
whichever worker serves the client. Plain Python and NumPy: no flwr, ray or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


from fedimg.config import FedimgConfig, HeterogeneityConfig
from fedimg.errors import FedimgError
from fedimg.seeds import derive_rng

ABSENT_CODE = 600  # Flower error code of an absent device's reply (Flower's own are < 600)
# Stream tags, so availability, dropout and speed draws never share random numbers.
_ONLINE, _DROP, _SPEED = 101, 102, 103


class DeviceAbsent(FedimgError):
    """A simulated device sent no update; its message starts with ``[<status>]``.

    Flower passes a ClientApp exception to the server as text only, so the status
    (``offline``, ``dropped``) travels as that tag (see :func:`absence_status`).
    """

    status = "absent"

    def __init__(self, message: str) -> None:
        super().__init__(f"[{self.status}] {message}")


class ClientOffline(DeviceAbsent):
    """A sampled client is not online this round (``hetero.availability``)."""

    status = "offline"


class ClientDropped(DeviceAbsent):
    """A client died part-way through its local training (``hetero.dropout``)."""

    status = "dropped"


def absence_status(error_text: str) -> str | None:
    """``offline`` / ``dropped`` if a client's error is a simulated absence, else None."""
    for kind in (ClientOffline, ClientDropped):
        if f"[{kind.status}] " in error_text:
            return kind.status
    return None


@dataclass(frozen=True)
class ClientConditions:
    """What one client's device does in one training round."""

    online: bool
    drop_after: float | None  # fraction of its local steps done before dying; None = none
    speed: float  # device compute time / this host's measured compute time


def enabled(h: HeterogeneityConfig) -> bool:
    """Whether any heterogeneity knob is on (off: clients behave as before)."""
    return (h.availability < 1 or h.dropout > 0 or h.speed_sigma > 0
            or h.speed_factors is not None or h.uplink_mbps is not None
            or h.downlink_mbps is not None or h.deadline_s is not None)


def _uniform(seed: int, tag: int, *keys: int) -> float:
    """A uniform [0, 1) number of its own stream: (seed, tag, keys) seed it alone."""
    return float(derive_rng(seed, tag, *keys).random())


def speed_factor(cfg: FedimgConfig, partition_id: int) -> float:
    """Client ``partition_id``'s fixed speed factor (1.0 when compute is homogeneous)."""
    h = cfg.hetero
    if h.speed_factors is not None:
        return float(h.speed_factors[partition_id])
    if h.speed_sigma == 0:
        return 1.0
    rng = derive_rng(cfg.seed, _SPEED, partition_id)
    return float(math.exp(h.speed_sigma * rng.standard_normal()))


def conditions(cfg: FedimgConfig, server_round: int, partition_id: int,
               attempt: int = 1) -> ClientConditions:
    """The seeded draw of client ``partition_id``'s conditions in ``server_round``.

    A retried round (``attempt`` > 1) draws afresh: a device that was offline may be
    back. The speed factor is the device's own and never changes.
    """
    h = cfg.hetero
    keys = (server_round, partition_id) if attempt == 1 else (server_round, partition_id,
                                                              attempt)
    online = _uniform(cfg.seed, _ONLINE, *keys) < h.availability
    drop_after = None
    if h.dropout > 0:
        rng = derive_rng(cfg.seed, _DROP, *keys)
        if rng.random() < h.dropout:
            drop_after = float(rng.random())
    return ClientConditions(online=online, drop_after=drop_after,
                            speed=speed_factor(cfg, partition_id))


def steps_before_drop(total_steps: int, drop_after: float) -> int:
    """Local steps a dropping client completes: floor(fraction x total), at least 0."""
    return max(0, min(total_steps - 1, int(drop_after * total_steps)))


def link_seconds(h: HeterogeneityConfig, *, bytes_down: int, bytes_up: int) -> float:
    """Transfer time of the global model down and the update up (0 for an unlimited link)."""
    down = bytes_down * 8 / (h.downlink_mbps * 1e6) if h.downlink_mbps else 0.0
    up = bytes_up * 8 / (h.uplink_mbps * 1e6) if h.uplink_mbps else 0.0
    return down + up


def device_seconds(h: HeterogeneityConfig, cond: ClientConditions, *, compute_s: float,
                   steps: int, bytes_down: int, bytes_up: int) -> float:
    """How long the round took on the device: its compute at its speed, plus its links.

    The compute is ``steps x step_s`` when ``hetero.step_s`` is set (reproducible: who
    misses the deadline does not depend on this host's load), else ``compute_s``, the
    time this host measured.
    """
    base = steps * h.step_s if h.step_s is not None else compute_s
    return base * cond.speed + link_seconds(h, bytes_down=bytes_down, bytes_up=bytes_up)


def real_deadline(h: HeterogeneityConfig) -> float | None:
    """The deadline the server enforces by waiting (``clock=real``), else None."""
    return h.deadline_s if h.clock == "real" else None


def real_delay(h: HeterogeneityConfig, *, device_s: float, compute_s: float) -> float:
    """Seconds a client sleeps under ``clock=real`` to arrive when its device would.

    A device cannot be faster than the host that simulates it (no negative delay),
    and a client stops sleeping just after the deadline, when the server has stopped
    waiting for it: sleeping on would only block its worker.
    """
    if h.clock != "real":
        return 0.0
    delay = max(0.0, device_s - compute_s)
    deadline = real_deadline(h)
    return delay if deadline is None else min(delay, max(0.0, deadline - compute_s) + 1.0)


def late(h: HeterogeneityConfig, device_s: float) -> bool:
    """Whether a reply that took ``device_s`` misses the round deadline (simulated clock)."""
    return h.clock == "simulated" and h.deadline_s is not None and device_s > h.deadline_s
