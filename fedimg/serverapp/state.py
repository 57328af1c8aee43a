"""The run's state: one object, owned by the round loop, saved whole in ``last.pt``.

:class:`RunState` holds everything a run knows between rounds: the last completed
round, the global arrays, the strategy (whose attributes are its state: FedAdam's
moments, a client-level DP ledger), the client sampler, the round records, the best
round, the update rejections per client, the DP-SGD ledgers clients reported, and
the count of rounds skipped in a row. The loop passes it to the reply filters and
the callbacks; nothing else keeps a copy. A resume restores this one object
(:mod:`fedimg.serverapp.checkpoint`) and the loop goes on from ``round + 1``.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy


@dataclass(frozen=True)
class Sampler:
    """Which clients a round asks: the loop's own generator, never global ``random``.

    Round r draws from ``Random(f"{seed}-{r}")``: its training sample first (again for
    each retry), then its evaluation sample, so a round's sample does not depend on
    anything drawn before it, and a resumed run samples what an unbroken one would.
    Under client-level DP the sample is part of the mechanism (privacy amplification
    by sampling) and must stay secret: it is then drawn from the OS's entropy.
    """

    seed: int
    secret: bool = False

    def for_round(self, server_round: int) -> random.Random:
        if self.secret:
            return random.SystemRandom()
        return random.Random(f"{self.seed}-{server_round}")

    @staticmethod
    def sample(rng: random.Random, node_ids: list[int], *, fraction: float,
               minimum: int) -> list[int]:
        """``max(int(n * fraction), minimum)`` of ``node_ids`` (Flower's sample size)."""
        size = min(len(node_ids), max(int(len(node_ids) * fraction), minimum))
        return rng.sample(node_ids, size)


def global_rng_state() -> dict[str, Any]:
    """NumPy's and torch's global generators (Flower's client-level DP wrapper draws its
    noise from NumPy's; fedimg itself draws nothing from either on the server)."""
    return {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_global_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`global_rng_state`; an empty dict draws fresh secret state."""
    if not state:  # secret noise: it was never saved, and 128 fresh bits replace it
        np.random.seed(np.frombuffer(secrets.token_bytes(16), dtype=np.uint32))
        return
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class RunState:
    """Everything the round loop carries from one round to the next."""

    arrays: ArrayRecord
    strategy: Strategy
    sampler: Sampler
    round: int = 0  # the last completed round; 0 = only the initial model
    rounds: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, in memory
    best: dict[str, Any] = field(default_factory=dict)  # the best round's record
    rejections: Counter[int] = field(default_factory=Counter)
    ledgers: dict[int, str] = field(default_factory=dict)  # DP-SGD ledgers as last reported
    ledgers_to_return: set[int] = field(default_factory=set)  # after a resume, until acked
    skips: int = 0  # rounds skipped in a row
    stopped: str | None = None  # why the run ended early

    def report_ledger(self, partition_id: int, ledger: str) -> None:
        """A client reported its ledger: keep it; the client holds it again from now on."""
        self.ledgers[partition_id] = ledger
        self.ledgers_to_return.discard(partition_id)

    def count_rejection(self, partition_id: int) -> int:
        self.rejections[partition_id] += 1
        return self.rejections[partition_id]

    def count_skip(self, skipped: bool) -> int:
        self.skips = self.skips + 1 if skipped else 0
        return self.skips
