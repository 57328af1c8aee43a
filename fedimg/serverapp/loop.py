"""The round loop: sample, send, filter the replies, aggregate, evaluate, call back.

Flower's ``Strategy.start`` runs every round in one call; fedimg drives the same
public methods itself (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) so that a run can start from a
checkpointed round, save one after each, sample clients from its own seeded
generator, and decide what a round with too few usable updates does. One round:

1. sample clients (:class:`~fedimg.serverapp.state.Sampler`) and let the strategy
   configure a message for each (:class:`~fedimg.transport.grid.NodeView`);
2. exchange them (:class:`~fedimg.transport.grid.Transport`);
3. run the reply filters (:mod:`fedimg.serverapp.filters`) on every reply;
4. aggregate the usable ones, or apply ``fl.on_too_few``: ``retry`` (default)
   samples and sends the round again up to ``fl.round_retries`` times, then skips
   it; ``skip`` keeps the global model; ``stop`` ends the run cleanly;
5. federated evaluation the same way;
6. the callbacks (:mod:`fedimg.serverapp.callbacks`) add their metrics to the round
   record and then act on it (metrics.jsonl, checkpoints, progress bar).

Whatever the policy, ``fl.max_skipped_rounds`` skipped rounds in a row end the run.
Nothing waits forever: every exchange is bounded by ``fl.timeout_s``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies

from fedimg.config import FedimgConfig
from fedimg.errors import PrivacyBudgetExhausted, RunStopped
from fedimg.serverapp.cohorts import group, split
from fedimg.serverapp.filters import FilterContext, apply_filters
from fedimg.serverapp.secure_round import SecureRound
from fedimg.serverapp.state import RunState, Sampler
from fedimg.serverapp.validation import UpdateChecks
from fedimg.simulation import fleet
from fedimg.transport.grid import Exchange, NodeView, Transport
from fedimg.transport.records import ATTEMPT_KEY, LEDGER_KEY, record_to_state_dict

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What one round did, for the callbacks: its exchanges and Flower's aggregates."""

    server_round: int
    state_dict: dict[str, torch.Tensor]  # the global model after the round
    exchanges: list[Exchange] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    skipped: bool = False
    stopped: bool = False  # the run ends in this round (recorded, not checkpointed)


@dataclass(frozen=True)
class LoopSetup:
    """What the loop needs besides the state: built once by the composition root."""

    cfg: FedimgConfig
    checks: UpdateChecks
    min_replies: int
    train_config: ConfigRecord
    evaluate_config: ConfigRecord
    reference: Mapping[str, torch.Tensor]
    context: Mapping[str, ArrayRecord] = field(default_factory=dict)  # sent with every message
    ledger_path: Path | None = None


class RoundLoop:
    """Runs the rounds after ``state.round`` up to ``cfg.rounds``, owning ``state``."""

    def __init__(self, setup: LoopSetup, state: RunState, transport: Transport,
                 callbacks: Sequence[Any]) -> None:
        self.setup, self.cfg, self.state = setup, setup.cfg, state
        self.transport, self.callbacks = transport, list(callbacks)
        self._tried: list[Exchange] = []  # this round's training exchanges, every attempt
        self._initial: RoundResult | None = None  # round 0, until recorded (run() sets it)
        bind = getattr(state.strategy, "bind_clients", None)  # per-client state (SCAFFOLD)
        if bind is not None:
            bind(transport.partition_of)
        self.secure = SecureRound(
            transport=transport, filter_context=lambda: self._filter_context(MessageType.TRAIN),
            max_weight=lambda pids: max([setup.checks.expected_sizes.get(p, 1) for p in pids]
                                        + [1]),
            min_replies=setup.min_replies, frozen=setup.checks.immutable_keys,
        ) if self.cfg.fl.secure_aggregation != "none" else None

    def run(self) -> None:
        """Round 0 (the initial model) on a fresh run, then every round to the last.

        Round 0 is recorded while round 1's clients train (its central evaluation
        overlaps their work), or before round 1's record if nothing was sent.
        """
        if self.state.round == 0 and not self.state.rounds:
            self._initial = RoundResult(0, self._state_dict())
        for server_round in range(self.state.round + 1, self.cfg.rounds + 1):
            rng = self.state.sampler.for_round(server_round)
            self._tried = []
            try:
                result = self.train(server_round, rng)
                self._record_initial()
            except (PrivacyBudgetExhausted, RunStopped):  # recorded with what it tried
                self._record_initial()
                self._end_round(RoundResult(server_round, self._state_dict(), self._tried,
                                            skipped=True, stopped=True))
                raise
            result.exchanges += self.evaluate(server_round, rng, result)
            self.state.round = server_round
            self._end_round(result)
            self._stop_after_skips(server_round, result)
        self._record_initial()  # rounds=0

    def _record_initial(self) -> None:
        """Record round 0 (the initial model), once, if this run has not yet."""
        if self._initial is not None:
            initial, self._initial = self._initial, None
            self._end_round(initial)

    def _end_round(self, result: RoundResult) -> None:
        """Build the round's record from the callbacks' metrics, then let them act on it."""
        record: dict[str, Any] = {"round": result.server_round, **result.train_metrics,
                                  **result.evaluate_metrics}
        for callback in self.callbacks:
            record.update(callback.metrics(self.state, result))
        for callback in self.callbacks:
            callback.on_record(self.state, result, record)

    def train(self, server_round: int, rng: random.Random) -> RoundResult:
        """One training round under the short-round policy."""
        fl = self.cfg.fl
        attempts = 1 + (fl.round_retries if fl.on_too_few == "retry" else 0)
        tried = self._tried
        for attempt in range(1, attempts + 1):
            if not self._enough_nodes(server_round):
                continue
            exchanges, aggregated, costs = self._train_once(server_round, rng, attempt)
            tried += exchanges
            if aggregated is not None:
                arrays, metrics = aggregated
                self.state.arrays = _keep_frozen(arrays, self.state.arrays,
                                                 self.setup.checks.immutable_keys)
                return RoundResult(server_round, self._state_dict(), tried,
                                   {**metrics, **costs}, attempts=attempt)
            _discard(exchanges, attempt)
            _stop_if_budgets_spent(server_round, exchanges)
            log.warning("round %d, attempt %d/%d: %d usable updates (at least %d needed) or "
                        "no aggregate; %s", server_round, attempt, attempts,
                        sum(e.status == "discarded" for e in exchanges),
                        self.setup.min_replies, _failure_summary(exchanges))
        if fl.on_too_few == "stop":
            raise RunStopped(f"round {server_round}: too few usable updates "
                             f"(fl.on_too_few=stop); {_failure_summary(tried)}")
        log.warning("round %d skipped: the global model is kept", server_round)
        return RoundResult(server_round, self._state_dict(), tried, attempts=attempts,
                           skipped=True)

    def _train_once(self, server_round: int, rng: random.Random, attempt: int
                    ) -> tuple[list[Exchange], tuple[ArrayRecord, dict[str, float]] | None,
                               dict[str, float]]:
        """One attempt: exchanges, the aggregate (or None), and secure-aggregation costs."""
        if self.secure is None:
            exchanges = self._send(MessageType.TRAIN, server_round, rng, attempt)
            return exchanges, self._aggregate(server_round, exchanges), {}
        messages = self._configure(MessageType.TRAIN, server_round, rng, attempt)
        if not messages:
            return [], None, {}
        self._record_initial()
        outcome = self.secure.run(server_round, self._outgoing(messages), rng=rng,
                                  cfg=self.cfg, strategy=self.state.strategy,
                                  timeouts=(self.cfg.secagg.timeout_s,
                                            self._wait(MessageType.TRAIN)[0]))
        return outcome.exchanges, outcome.aggregate, outcome.metrics

    def _aggregate(self, server_round: int, exchanges: list[Exchange]
                   ) -> tuple[ArrayRecord, dict[str, float]] | None:
        """The strategy's aggregate of the usable updates, if there are enough of them."""
        usable = [e.reply for e in exchanges if e.usable]
        if len(usable) < self.setup.min_replies:
            return None
        try:
            arrays, metrics = self.state.strategy.aggregate_train(server_round, usable)
        except InconsistentMessageReplies as exc:  # the filters should have caught it
            log.error("round %d: the strategy refused the filtered replies (%s); the "
                      "round is short", server_round, exc)
            return None
        return None if arrays is None else (arrays, dict(metrics or {}))

    def evaluate(self, server_round: int, rng: random.Random,
                 result: RoundResult) -> list[Exchange]:
        """Federated evaluation on the clients' validation splits."""
        if len(self.transport.node_ids()) < self.cfg.fl.min_train_clients:
            log.warning("round %d: too few clients connected; federated evaluation skipped",
                        server_round)
            return []
        exchanges = self._send(MessageType.EVALUATE, server_round, rng)
        usable = [e.reply for e in exchanges if e.usable]
        if usable:
            metrics = self.state.strategy.aggregate_evaluate(server_round, usable)
            result.evaluate_metrics = dict(metrics or {})
        return exchanges

    def _send(self, phase: str, server_round: int, rng: random.Random,
              attempt: int = 1) -> list[Exchange]:
        """Sample, configure, exchange and filter one batch of ``phase`` messages."""
        messages = self._configure(phase, server_round, rng, attempt)
        if not messages:
            return []
        timeout, _ = self._wait(phase)
        size = self.cfg.sim.cohort_size if phase == MessageType.TRAIN else 1  # cohorts.py
        sent = group(self._outgoing(messages), size, partition_of=self.transport.partition_of)
        exchanges = split(self.transport.exchange(sent.messages, timeout=timeout,
                                                  while_waiting=self._record_initial), sent)
        apply_filters(exchanges, self._filter_context(phase))
        return exchanges

    def _filter_context(self, phase: str) -> FilterContext:
        return FilterContext(checks=self.setup.checks, state=self.state, hetero=self.cfg.hetero,
                             late=self._wait(phase)[1], ledger_path=self.setup.ledger_path)

    def _configure(self, phase: str, server_round: int, rng: random.Random,
                   attempt: int) -> list[Message]:
        """The strategy's messages for the clients this round's generator samples."""
        fl, train = self.cfg.fl, phase == MessageType.TRAIN
        fraction = fl.fraction_train if train else fl.fraction_evaluate
        minimum = fl.min_train_clients if train else fl.min_evaluate_clients
        if fraction == 0:
            return []
        sampled = Sampler.sample(rng, self.transport.node_ids(), fraction=fraction,
                                 minimum=minimum)
        if not sampled:  # e.g. int(5 x 0.1) = 0 evaluating clients: nothing to send
            return []
        view = NodeView(sampled)
        config = ConfigRecord(dict(self.setup.train_config if train
                                   else self.setup.evaluate_config))
        if train:
            config[ATTEMPT_KEY] = attempt
            return list(self.state.strategy.configure_train(
                server_round, self.state.arrays, config, view))
        return list(self.state.strategy.configure_evaluate(
            server_round, self.state.arrays, config, view))

    def _outgoing(self, messages: list[Message]) -> list[Message]:
        """Add the run context (simulated partitions), and hand back restored ledgers."""
        for content in {id(m.content): m.content for m in messages}.values():
            for key, record in self.setup.context.items():
                content[key] = record
        return [self._with_ledger(m) for m in messages]

    def _with_ledger(self, message: Message) -> Message:
        """``message``, carrying its client's restored DP ledger if one is pending."""
        pid = self.transport.partition_of(message.metadata.dst_node_id)
        if message.metadata.message_type != MessageType.TRAIN or \
                pid not in self.state.ledgers_to_return:
            return message
        content = RecordDict(dict(message.content.items()))  # strategies share one content
        content[LEDGER_KEY] = ConfigRecord({"json": self.state.ledgers[pid]})
        return Message(content=content, message_type=message.metadata.message_type,
                       dst_node_id=message.metadata.dst_node_id,
                       group_id=message.metadata.group_id)

    def _wait(self, phase: str) -> tuple[float, tuple[str, str]]:
        """How long an exchange waits, and what a missing reply is then."""
        deadline = fleet.real_deadline(self.cfg.hetero)  # validated below fl.timeout_s
        if phase != MessageType.TRAIN or deadline is None:
            return self.cfg.fl.timeout_s, ("timeout", "no reply before fl.timeout_s")
        return deadline, ("straggler",
                          f"no reply before the hetero.deadline_s={deadline}s deadline")

    def _enough_nodes(self, server_round: int) -> bool:
        """Wait up to ``fl.connect_timeout_s`` for ``fl.min_train_clients`` nodes.

        In a deployment where SuperNodes went away, waiting without a limit would
        hang the run. A simulation always has all its nodes.
        """
        need, wait = self.cfg.fl.min_train_clients, self.cfg.fl.connect_timeout_s
        deadline = time.monotonic() + wait
        while (have := len(self.transport.node_ids())) < need:
            if time.monotonic() > deadline:
                log.warning("round %d: only %d of the %d clients needed are connected "
                            "after fl.connect_timeout_s=%gs", server_round, have, need, wait)
                return False
            time.sleep(min(1.0, wait / 10))
        return True

    def _state_dict(self) -> dict[str, torch.Tensor]:
        return record_to_state_dict(self.state.arrays, self.setup.reference)

    def _stop_after_skips(self, server_round: int, result: RoundResult) -> None:
        skips, limit = self.state.count_skip(result.skipped), self.cfg.fl.max_skipped_rounds
        if skips >= limit:
            raise RunStopped(f"round {server_round}: {skips} rounds in a row were skipped "
                             f"(fl.max_skipped_rounds={limit}); see the client statuses in "
                             "metrics.jsonl")


def _keep_frozen(aggregate: ArrayRecord, sent: ArrayRecord, frozen: frozenset[str]
                 ) -> ArrayRecord:
    """The aggregate with every frozen array taken from the model sent, to the bit.

    Every usable reply returned the frozen arrays unchanged (the update checks insist),
    but a weighted mean of equal float32 values is not always that value to the last
    bit. Keeping them bit-exact is what lets a client's frozen-trunk feature cache,
    keyed by those bits, stay warm from round to round.
    """
    if not frozen:
        return aggregate
    kept = ArrayRecord()
    for key in aggregate.keys():
        kept[key] = sent[key] if key in frozen and key in sent else aggregate[key]
    return kept


def _discard(exchanges: list[Exchange], attempt: int) -> None:
    """Mark the usable updates of an attempt that was not aggregated."""
    for e in exchanges:
        if e.usable:
            e.status = "discarded"
            e.reason = f"attempt {attempt} had too few usable updates; not aggregated"


def _failure_summary(exchanges: list[Exchange]) -> str:
    bad = [e for e in exchanges if e.status not in ("ok", "discarded")]
    if not bad:
        return "no client failed (the strategy released no aggregate)" if exchanges \
            else "no client was sampled"
    first = bad[0].reason.strip().splitlines()[-1:] or [""]
    return f"{len(bad)} not usable, e.g. client {bad[0].partition_id} {bad[0].status}: " \
           f"{first[0][:200]}"


def _stop_if_budgets_spent(server_round: int, exchanges: list[Exchange]) -> None:
    if exchanges and all(e.status == "declined" for e in exchanges):
        raise PrivacyBudgetExhausted(f"round {server_round}: every sampled client "
                                     "declined, its privacy budget spent; stopping")
