"""The round loop: a Flower strategy driven round by round, with a policy for short rounds.

Flower's ``Strategy.start`` runs every round in one call. fedimg drives the same
public methods itself (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) so that a run can start from a
checkpointed round, checkpoint after each one, and decide what a round with too
few usable updates does.

A training update is usable unless its client failed (an exception, a dead worker
process), timed out (``fl.timeout_s``), declined (privacy budget) or was rejected
(see :mod:`fedimg.serverapp.validation`). When fewer than ``fl.min_replies``
updates are usable (or fewer than the strategy needs to stay robust: 2f + 3 for
Krum, 1/beta for FedTrimmedAvg, 3 for FedMedian), ``fl.on_too_few`` decides:

* ``retry`` (default): sample and send the round again, up to ``fl.round_retries``
  times (dead Ray workers have been restarted by then); if it is still short, skip it.
* ``skip``: keep the current global model and go on to the next round.
* ``stop``: end the run cleanly (results, plots and checkpoints are written).

Whatever the policy, ``fl.max_skipped_rounds`` consecutive skipped rounds end the
run, so a fault that repeats every round cannot burn the whole schedule. Every
attempt is recorded in ``metrics.jsonl`` (``attempts``, ``skipped``, and each
client's status and reason). Nothing waits forever: every exchange is bounded by
``fl.timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp.strategy import Strategy

from fedimg.simulation import fleet
from fedimg.config import FedimgConfig
from fedimg.errors import PrivacyBudgetExhausted, RunStopped
from fedimg.transport.grid import ClientExchange, InstrumentedGrid
from fedimg.transport.records import ATTEMPT_KEY
from fedimg.serverapp.strategies import min_replies

log = logging.getLogger(__name__)

@dataclass
class RoundOutcome:
    """How a training round went."""

    arrays: ArrayRecord
    attempts: int
    skipped: bool
    stopped: bool = False  # the run ends in this round (recorded, not checkpointed)


class RoundLoop:
    """Runs rounds ``start..cfg.rounds`` of ``strategy`` on ``grid``."""

    def __init__(self, cfg: FedimgConfig, strategy: Strategy, grid: InstrumentedGrid, *,
                 train_config: ConfigRecord, evaluate_config: ConfigRecord) -> None:
        self.cfg, self.strategy, self.grid = cfg, strategy, grid
        self.train_config, self.evaluate_config = train_config, evaluate_config
        self.min_replies = max(cfg.fl.min_replies, min_replies(cfg))
        self.consecutive_skips = 0

    def run(self, arrays: ArrayRecord, *, start: int,
            on_round_end: Callable[[int, ArrayRecord, RoundOutcome | None], None]) -> None:
        """Round 0 (the initial model) if ``start == 1``, then every round to the last."""
        if start == 1:
            on_round_end(0, arrays, None)
        for server_round in range(start, self.cfg.rounds + 1):
            try:
                outcome = self.train(server_round, arrays)
            except (PrivacyBudgetExhausted, RunStopped):
                on_round_end(server_round, arrays, RoundOutcome(
                    arrays, attempts=0, skipped=True, stopped=True))
                raise
            arrays = outcome.arrays
            self.evaluate(server_round, arrays)
            on_round_end(server_round, arrays, outcome)
            self._count_skip(server_round, outcome)

    def train(self, server_round: int, arrays: ArrayRecord) -> RoundOutcome:
        """One training round under the short-round policy."""
        fl = self.cfg.fl
        attempts = 1 + (fl.round_retries if fl.on_too_few == "retry" else 0)
        tried: list[ClientExchange] = []
        for attempt in range(1, attempts + 1):
            mark = len(self.grid.exchanges)
            if not self._enough_nodes(server_round):
                continue
            config = ConfigRecord(dict(self.train_config))
            config[ATTEMPT_KEY] = attempt
            messages = self.strategy.configure_train(server_round, arrays, config, self.grid)
            replies = list(self.grid.send_and_receive(messages, **self._train_wait()))
            usable = sum(not reply.has_error() for reply in replies)
            if usable >= self.min_replies:
                new_arrays, _ = self.strategy.aggregate_train(server_round, replies)
                if new_arrays is not None:
                    return RoundOutcome(new_arrays, attempt, skipped=False)
            tried = self.grid.exchanges[mark:]
            _discard(tried, attempt)
            _stop_if_budgets_spent(server_round, tried)
            log.warning("round %d, attempt %d/%d: %d usable updates (at least %d needed) or "
                        "no aggregate; %s", server_round, attempt, attempts, usable,
                        self.min_replies, _failure_summary(tried))
        if fl.on_too_few == "stop":
            raise RunStopped(f"round {server_round}: too few usable updates "
                             f"(fl.on_too_few=stop); {_failure_summary(tried)}")
        log.warning("round %d skipped: the global model is kept", server_round)
        return RoundOutcome(arrays, attempts, skipped=True)

    def _train_wait(self) -> dict[str, Any]:
        """How long a training round waits: ``fl.timeout_s``, or a real round deadline."""
        deadline = fleet.real_deadline(self.cfg.hetero)  # validated below fl.timeout_s
        if deadline is None:
            return {"timeout": self.cfg.fl.timeout_s}
        return {"timeout": deadline, "late": (
            "straggler", f"no reply before the hetero.deadline_s={deadline}s deadline")}

    def _enough_nodes(self, server_round: int) -> bool:
        """Wait up to ``fl.connect_timeout_s`` for the nodes the strategy samples from.

        Flower's sampling waits for ``min_available_nodes`` without a limit; in a
        deployment where SuperNodes went away that would hang the run. A simulation
        always has all its nodes.
        """
        need = _innermost(self.strategy).min_available_nodes
        deadline = time.monotonic() + self.cfg.fl.connect_timeout_s
        while (have := len(list(self.grid.get_node_ids()))) < need:
            if time.monotonic() > deadline:
                log.warning("round %d: only %d of the %d clients needed are connected "
                            "after fl.connect_timeout_s=%gs", server_round, have, need,
                            self.cfg.fl.connect_timeout_s)
                return False
            time.sleep(min(1.0, self.cfg.fl.connect_timeout_s / 10))
        return True

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> None:
        """Federated evaluation on the clients' validation splits (recorded by the grid)."""
        if len(list(self.grid.get_node_ids())) < _innermost(self.strategy).min_available_nodes:
            log.warning("round %d: too few clients connected; federated evaluation skipped",
                        server_round)
            return
        messages = self.strategy.configure_evaluate(server_round, arrays,
                                                    self.evaluate_config, self.grid)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.fl.timeout_s))
        if any(not reply.has_error() for reply in replies):
            self.strategy.aggregate_evaluate(server_round, replies)

    def _count_skip(self, server_round: int, outcome: RoundOutcome) -> None:
        self.consecutive_skips = self.consecutive_skips + 1 if outcome.skipped else 0
        limit = self.cfg.fl.max_skipped_rounds
        if self.consecutive_skips >= limit:
            raise RunStopped(f"round {server_round}: {self.consecutive_skips} rounds in a "
                             f"row were skipped (fl.max_skipped_rounds={limit}); see the "
                             "client statuses in metrics.jsonl")


def _innermost(strategy: Strategy) -> Strategy:
    """The strategy a wrapper (Flower's DP wrappers) delegates sampling to."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    return strategy


def _discard(exchanges: list[ClientExchange], attempt: int) -> None:
    """Mark the usable updates of an attempt that was not aggregated."""
    for e in exchanges:
        if e.phase == MessageType.TRAIN and e.status == "ok":
            e.status = "discarded"
            e.reason = f"attempt {attempt} had too few usable updates; not aggregated"


def _failure_summary(exchanges: list[ClientExchange]) -> str:
    bad = [e for e in exchanges if e.phase == MessageType.TRAIN
           and e.status not in ("ok", "discarded")]
    if not bad:
        return "no client failed (the strategy released no aggregate)" if exchanges \
            else "no client was sampled"
    first = bad[0].reason.strip().splitlines()[-1:] or [""]
    return f"{len(bad)} not usable, e.g. client {bad[0].partition_id} {bad[0].status}: " \
           f"{first[0][:200]}"


def _stop_if_budgets_spent(server_round: int, exchanges: list[ClientExchange]) -> None:
    trained = [e for e in exchanges if e.phase == MessageType.TRAIN]
    if trained and all(e.status == "declined" for e in trained):
        raise PrivacyBudgetExhausted(f"round {server_round}: every sampled client "
                                     "declined, its privacy budget spent; stopping")
