"""Reply filters: what the server decides about each reply before a strategy sees it.

The round loop runs :data:`REPLY_FILTERS` in order on every :class:`Exchange` of a
round, training and evaluation alike (the client-side analogue is Flower's mods).
Each filter does one thing: it reads the exchange, may fill it in (metrics, decoded
arrays), and sets it aside by raising :class:`SetAside` (a status and a reason).
An :class:`~fedimg.errors.UpdateError`, or any exception decoding what a client sent,
is a rejected reply: a malformed or hostile message never stops the run. The first
filter that sets an exchange aside ends its chain. Then the round filters
(:data:`ROUND_FILTERS`) look at the usable replies together (norm outliers).

To add a filter: write ``def my_filter(exchange, ctx) -> None`` (it sees training and
evaluation replies: check ``exchange.phase``), raise ``UpdateError(why)`` to reject a
reply (counted against its client) or ``SetAside(status, why)`` for one that is not
aggregated but not a fault, and put it in :data:`REPLY_FILTERS` where it belongs (after
``read_metrics`` if it reads metrics).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MessageType, RecordDict

from fedimg.config import HeterogeneityConfig
from fedimg.errors import FedimgError, UpdateError
from fedimg.reporting.run_dir import write_json
from fedimg.serverapp.state import RunState
from fedimg.serverapp.validation import UpdateChecks, metrics_of
from fedimg.simulation import fleet
from fedimg.transport.codecs import decompress_update
from fedimg.transport.grid import Exchange, error_summary
from fedimg.transport.packing import unpack_content
from fedimg.transport.records import (
    ARRAYS_KEY,
    COMPRESSION_KEY,
    DECLINED_KEY,
    LEDGER_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    split_counts,
)

log = logging.getLogger(__name__)

# Record names a reply may carry; anything else is a malformed reply (Flower's strategies
# refuse a second ArrayRecord or MetricRecord, and would end the round).
_REPLY_RECORDS = {MessageType.TRAIN: ({ARRAYS_KEY}, {METRICS_KEY},
                                      {LEDGER_KEY, DECLINED_KEY, COMPRESSION_KEY}),
                  MessageType.EVALUATE: (set(), {METRICS_KEY}, set())}


class SetAside(Exception):
    """Raised by a filter: this reply is not aggregated, with ``status`` and ``reason``."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class FilterContext:
    """What the filters of one exchange batch share: the checks, the state, the deadline."""

    checks: UpdateChecks
    state: RunState
    hetero: HeterogeneityConfig
    late: tuple[str, str] = ("timeout", "no reply before fl.timeout_s")
    ledger_path: Path | None = None  # the reported DP ledgers, written as they arrive
    _sent: dict[int, dict[str, np.ndarray] | None] = field(default_factory=dict)

    def global_arrays(self, sent: RecordDict) -> dict[str, np.ndarray] | None:
        """The global arrays a message carried, decoded once per round's shared content."""
        key = id(sent)
        if key not in self._sent:
            self._sent[key] = ({k: v.numpy() for k, v in sent[ARRAYS_KEY].items()}
                               if ARRAYS_KEY in sent.array_records else None)
        return self._sent[key]


ReplyFilter = Callable[[Exchange, FilterContext], None]


def missing_reply(e: Exchange, ctx: FilterContext) -> None:
    """No reply before the deadline: a timeout, or a straggler under a real-clock deadline."""
    if e.reply is None:
        raise SetAside(*ctx.late)


def error_reply(e: Exchange, ctx: FilterContext) -> None:
    """A client error: a failure, or a simulated device's absence (not a fault)."""
    if e.reply is not None and e.reply.has_error():
        raw = str(e.reply.error.reason)
        absent = fleet.absence_status(raw) if e.reply.error.code == fleet.ABSENT_CODE else None
        status = absent or "failed"
        (log.debug if absent else log.warning)(
            "client %d %s in %s: %s", e.partition_id, status, e.phase, error_summary(raw))
        raise SetAside(status, error_summary(raw))


def reply_size(e: Exchange, ctx: FilterContext) -> None:
    """A reply bigger than ``fl.max_reply_mb`` (default: 4x the model + 1 MB) is refused
    before anything in it is decoded."""
    limit = ctx.checks.max_reply_bytes
    if limit is not None and e.bytes_up > limit:
        raise UpdateError(f"reply of {e.bytes_up / 1e6:.1f} MB exceeds the "
                          f"{limit / 1e6:.1f} MB a reply may have (fl.max_reply_mb)")


def unpack(e: Exchange, ctx: FilterContext) -> None:
    """Arrays packed into one buffer (``fl.pack_arrays``) become an ArrayRecord again."""
    assert e.reply is not None
    e.reply.content = unpack_content(e.reply.content)


def record_names(e: Exchange, ctx: FilterContext) -> None:
    """Only the records a fedimg client sends, each at most once (one MetricRecord)."""
    content = e.reply.content  # type: ignore[union-attr]
    arrays, metrics, configs = _REPLY_RECORDS.get(e.phase, (set(), set(), set()))
    extra = ((set(content.array_records) - arrays) | (set(content.config_records) - configs)
             | (set(content.metric_records) - metrics))
    if extra or set(content.metric_records) != metrics:
        raise UpdateError(f"reply carries records {sorted(content.keys())[:5]}; a "
                          f"{e.phase} reply has {sorted(arrays | metrics | configs)}")


def read_metrics(e: Exchange, ctx: FilterContext) -> None:
    """The reply's metrics and example count: numbers, the count a whole number >= 0.

    An evaluation reply is held to the validation size its client reported at start-up
    (its weight in the federated metrics), as a training reply is to its partition size.
    Its per-class validation counts (``val/count/*``) go to ``e.class_counts`` and out
    of the reply: nothing downstream averages or compares them.
    """
    assert e.reply is not None
    record = e.reply.content[METRICS_KEY]
    count = record.get(NUM_EXAMPLES_KEY)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UpdateError(f"reply's '{NUM_EXAMPLES_KEY}' is {count!r}, not a count")
    e.class_counts = {k: float(v) for k, v in split_counts(e.reply).items()}
    e.metrics, e.num_examples = metrics_of(e.reply.content)
    infinite = [k for k, v in e.metrics.items() if math.isinf(v)]
    if infinite:  # NaN is a value (no AUC on a one-class split); infinity is not
        raise UpdateError(f"reply's metric '{infinite[0]}' is infinite")
    expected = ctx.checks.expected_val_sizes.get(e.partition_id)
    if e.phase == MessageType.EVALUATE and expected is not None and e.num_examples != expected:
        raise UpdateError(f"evaluation reply claims {e.num_examples} examples; this "
                          f"client's validation split has {expected}")


def keep_ledger(e: Exchange, ctx: FilterContext) -> None:
    """A DP-SGD client's ledger report goes to the run state (its one server-side copy)."""
    assert e.reply is not None
    if LEDGER_KEY in e.reply.content.config_records:
        ctx.state.report_ledger(e.partition_id, str(e.reply.content[LEDGER_KEY]["json"]))
        if ctx.ledger_path is not None:  # a crash mid-round must not forget what was spent
            write_json(ctx.ledger_path, {str(k): v for k, v in sorted(ctx.state.ledgers.items())})


def declined(e: Exchange, ctx: FilterContext) -> None:
    """A client that refused to train (its privacy budget is spent)."""
    assert e.reply is not None
    if DECLINED_KEY in e.reply.content.config_records:
        reason = str(e.reply.content[DECLINED_KEY].get("reason", ""))
        log.info("client %d declined to train: %s", e.partition_id, reason)
        raise SetAside("declined", reason)


def straggler(e: Exchange, ctx: FilterContext) -> None:
    """A training reply whose simulated device time is past ``hetero.deadline_s``."""
    device_s = e.metrics.get("fleet/device_s", 0.0)
    if e.phase == MessageType.TRAIN and fleet.late(ctx.hetero, device_s):
        raise SetAside("straggler", f"arrived after {device_s:.2f}s of device time, past "
                                    f"the hetero.deadline_s={ctx.hetero.deadline_s}s")


def decompress(e: Exchange, ctx: FilterContext) -> None:
    """A training update's arrays, decoded; a compressed one is rebuilt, in the reply too."""
    if e.phase != MessageType.TRAIN:
        return
    content = e.reply.content  # type: ignore[union-attr]
    if ARRAYS_KEY not in content.array_records:
        raise UpdateError("training reply carries no model update")
    arrays = {k: v.numpy() for k, v in content[ARRAYS_KEY].items()}
    if COMPRESSION_KEY in content.config_records:
        start = ctx.global_arrays(e.sent.content)
        if start is None:
            raise UpdateError("compressed update for a message that carried no model")
        try:
            arrays = decompress_update(str(content[COMPRESSION_KEY]["codec"]), arrays, start)
        except FedimgError as exc:  # an unknown codec is a malformed update here
            raise UpdateError(str(exc)) from exc
        content[ARRAYS_KEY] = ArrayRecord({k: Array(np.asarray(v, order="C"))
                                           for k, v in arrays.items()})
    e.arrays = arrays


def frozen_home(e: Exchange, ctx: FilterContext) -> None:
    """A training reply leaves its frozen arrays out (:mod:`fedimg.transport.elision`, and
    a compressed one always did): they are the ones sent, put back here, without a copy,
    before any check or strategy reads the reply."""
    start = ctx.global_arrays(e.sent.content) if e.phase == MessageType.TRAIN else None
    if start is None:
        return
    missing = [k for k in ctx.checks.immutable_keys if k not in e.arrays and k in start]
    if not missing:
        return
    content = e.reply.content  # type: ignore[union-attr]
    sent, reply = e.sent.content[ARRAYS_KEY], content[ARRAYS_KEY]
    order = [*sent.keys(), *(k for k in reply.keys() if k not in sent)]
    content[ARRAYS_KEY] = ArrayRecord(  # the sent Arrays themselves: no copy
        {k: reply[k] if k in reply else sent[k] for k in order if k in reply or k in missing})
    e.arrays.update({k: start[k] for k in missing})


def check_update(e: Exchange, ctx: FilterContext) -> None:
    """A training update must match the model and be plausible (see UpdateChecks)."""
    if e.phase == MessageType.TRAIN:
        e.update_norm = ctx.checks.check(e.arrays, ctx.global_arrays(e.sent.content),
                                         num_examples=e.num_examples,
                                         partition_id=e.partition_id)


def strategy_needs(e: Exchange, ctx: FilterContext) -> None:
    """What the strategy itself reads of a training reply (FedNova, SCAFFOLD: the local
    steps), checked by its ``check_reply(metrics)`` if it has one."""
    check = getattr(ctx.state.strategy, "check_reply", None)
    if e.phase == MessageType.TRAIN and check is not None:
        check(e.metrics)


REPLY_FILTERS: tuple[ReplyFilter, ...] = (
    missing_reply, error_reply, reply_size, unpack, record_names, read_metrics, keep_ledger,
    declined, straggler, decompress, frozen_home, check_update, strategy_needs)


def norm_outliers(exchanges: list[Exchange], ctx: FilterContext) -> None:
    """Set aside updates whose norm is far above the round's median (absurd, not large)."""
    outliers = ctx.checks.outliers({e.node_id: e.update_norm for e in exchanges if e.usable})
    for e in exchanges:
        if e.usable and e.node_id in outliers:
            reject(e, ctx, outliers[e.node_id])


def same_metric_keys(exchanges: list[Exchange], ctx: FilterContext) -> None:
    """Set aside replies whose metric keys differ from most of the round's (Flower would
    refuse to aggregate them all); ties go to the first client's keys. The per-class
    validation counts, which differ under label skew by design, are not metrics here
    (:func:`read_metrics` set them apart)."""
    for phase in {e.phase for e in exchanges}:
        usable = [e for e in exchanges if e.usable and e.phase == phase]
        keys = [frozenset(e.metrics) for e in usable]
        if len(set(keys)) <= 1:
            continue
        common = max(dict.fromkeys(keys), key=keys.count)
        for e, k in zip(usable, keys):
            if k != common:
                reject(e, ctx, f"its metric keys {sorted(k ^ common)[:4]} differ from the "
                               "other clients' this round")


ROUND_FILTERS = (same_metric_keys, norm_outliers)


def reject(e: Exchange, ctx: FilterContext, reason: str) -> None:
    """Mark ``e`` rejected and count it against its client."""
    e.status, e.reason = "rejected", reason
    count = ctx.state.count_rejection(e.partition_id)
    log.warning("rejected update of client %d: %s (rejections so far: %d)",
                e.partition_id, reason, count)


def apply_filters(exchanges: list[Exchange], ctx: FilterContext,
                  filters: tuple[ReplyFilter, ...] = REPLY_FILTERS) -> None:
    """Run the reply filters on every exchange, then the round filters on the batch."""
    for e in exchanges:
        try:
            for step in filters:
                step(e, ctx)
        except SetAside as aside:
            e.status, e.reason = aside.status, aside.reason
        except UpdateError as exc:
            reject(e, ctx, str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever a hostile reply makes a decoder
            # raise (numpy's loader alone has EOFError, BadZipFile, AttributeError) is a
            # rejected reply, never a crashed round
            reject(e, ctx, f"malformed reply ({type(exc).__name__}: {str(exc)[:200]})")
    for round_filter in ROUND_FILTERS:
        round_filter(exchanges, ctx)
