"""One training round under SecAgg+: four exchanges, then only the sum reaches the strategy.

With ``fl.secure_aggregation=secaggplus`` the round loop hands its sampled training
messages here instead of sending them as they are (Bell et al. 2020, SecAgg+; the
client side is :mod:`fedimg.clientapp.secure`, the arithmetic :mod:`fedimg.privacy.secagg`):

1. ``setup``: the plan (:func:`~fedimg.privacy.distributed_dp.round_plan`) and the run
   config to every sampled client; each answers two public keys;
2. ``share_keys``: each client gets its neighbours' keys (a ring over a seeded shuffle,
   ``shares`` wide) and answers encrypted shares, forwarded to their recipients;
3. ``collect``: the strategy's training message plus the shares; each client trains and
   answers its masked contribution (metrics in the clear);
4. ``unmask``: each contributor is told which neighbours survived and which dropped;
   from the shares it answers the server rebuilds the survivors' self masks and the
   dropped clients' pairwise masks, and so the sum alone.

The strategy then aggregates one reply holding the weighted mean of the updates (so
FedAvg, FedProx, FedAvgM, FedAdam and FedYogi work unchanged). A client that fails,
times out or refuses at any stage is dropped; the round still ends with the exact sum of
the survivors while every neighbourhood keeps ``threshold`` of them, and is short
otherwise (``fl.on_too_few``). Seconds and bytes of each stage go into the round's
metrics (``secagg/*``).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedimg.privacy import secagg_keys
from fedimg.privacy.distributed_dp import round_plan
from fedimg.privacy.secagg import (
    HEADER,
    byte_strings,
    SecAggError,
    SecAggPlan,
    coordinate_scale,
    decode,
    flatten,
    mask,
    unflatten,
)
from fedimg.serverapp.filters import (
    FilterContext,
    apply_filters,
    declined,
    error_reply,
    keep_ledger,
    missing_reply,
    read_metrics,
    reply_size,
    straggler,
)
from fedimg.transport.grid import Exchange, Transport
from fedimg.transport.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SECAGG_KEY,
    SECAGG_VECTOR_KEY,
    aggregate_metrics,
)

log = logging.getLogger(__name__)
STAGES = ("setup", "share_keys", "collect", "unmask")


def _config_bytes(content: RecordDict) -> int:
    """Bytes of a message's config records as Flower serialises them (the transport
    already counted its arrays; serialising those again would copy the model)."""
    configs = RecordDict(dict(content.config_records.items()))
    return int(recorddict_to_proto(configs).ByteSize())


@dataclass
class SecureOutcome:
    """What a secure round produced: per-client exchanges, the sum, the cost per stage."""

    exchanges: list[Exchange] = field(default_factory=list)
    aggregate: tuple[ArrayRecord, dict[str, float]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Round:
    """The server's view of one secure round (dropped at its end)."""

    number: int
    plan: SecAggPlan
    neighbours: dict[int, set[int]]
    keys: list[str]  # the arrays summed, in this order (frozen ones are not)
    last: dict[int, Exchange] = field(default_factory=dict)  # node -> its latest exchange
    publics: dict[int, list[bytes]] = field(default_factory=dict)
    inbox: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    shares: dict[int, dict[str, list[bytes]]] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)

    def alive(self) -> list[int]:
        return sorted(n for n, e in self.last.items() if e.usable)


class SecureRound:
    """Runs SecAgg+ over the loop's transport; the loop still owns the state."""

    def __init__(self, *, transport: Transport, filter_context: Callable[[], FilterContext],
                 max_weight: Callable[[list[int]], int], min_replies: int,
                 frozen: frozenset[str] = frozenset()) -> None:
        self.transport, self.filter_context = transport, filter_context
        self.max_weight, self.min_replies = max_weight, min_replies
        self.frozen = frozen  # never trained: left out of the masked vector

    def run(self, server_round: int, messages: list[Message], *, rng: random.Random,
            cfg: Any, strategy: Any, timeouts: tuple[float, float]) -> SecureOutcome:
        """The round's outcome: an aggregate, or None with every client's status."""
        nodes = [m.metadata.dst_node_id for m in messages]
        pids = [self.transport.partition_of(n) for n in nodes]
        arrays = messages[0].content[ARRAYS_KEY]
        keys = sorted(k for k in arrays.keys() if k not in self.frozen)
        dim = sum(int(np.asarray(arrays[k].numpy()).size) for k in keys)
        plan = round_plan(cfg, sampled=len(nodes), dim=dim, max_weight=self.max_weight(pids))
        state = _Round(server_round, plan, ring(nodes, plan.shares, rng), keys)
        config = messages[0].content.config_records["config"]
        stage_timeout, train_timeout = timeouts
        self._setup(state, config, stage_timeout)
        self._share(state, stage_timeout)
        self._collect(state, {m.metadata.dst_node_id: m for m in messages}, train_timeout)
        outcome = SecureOutcome(metrics=dict(state.costs))
        try:
            if len(state.vectors) < max(self.min_replies, 1):
                raise SecAggError(f"{len(state.vectors)} masked updates arrived")
            self._unmask(state, stage_timeout)
            outcome.aggregate = self._release(state, messages, strategy, cfg)
        except (SecAggError, ValueError, TypeError, IndexError) as exc:  # e.g. bogus shares
            log.warning("round %d: secure aggregation released nothing: %s: %s", server_round,
                        type(exc).__name__, exc)
            for e in state.last.values():
                if e.usable:
                    e.status, e.reason = "discarded", f"secure aggregation failed: {exc}"
        outcome.metrics.update(state.costs)
        outcome.exchanges = [state.last[n] for n in sorted(state.last, key=self._order)]
        return outcome

    def _order(self, node: int) -> tuple[int, int]:
        return self.transport.partition_of(node), node

    def _exchange(self, state: _Round, stage: str, requests: dict[int, RecordDict],
                  timeout: float, filters: tuple = (missing_reply, error_reply, reply_size)
                  ) -> list[Exchange]:
        """Send one stage's requests, filter the replies, and count its cost."""
        started = time.perf_counter()
        outgoing = [Message(content=c, message_type=MessageType.TRAIN, dst_node_id=n,
                            group_id=str(state.number)) for n, c in requests.items()]
        exchanges = self.transport.exchange(outgoing, timeout=timeout)
        apply_filters(exchanges, self.filter_context(), filters)
        for e in exchanges:
            e.bytes_down += _config_bytes(e.sent.content)
            if e.reply is not None and not e.reply.has_error():
                e.bytes_up += _config_bytes(e.reply.content)
            if not e.usable:
                e.reason = f"secure aggregation, {stage}: {e.reason}"
            state.last[e.node_id] = e
        state.costs[f"secagg/{stage}_s"] = time.perf_counter() - started
        state.costs[f"secagg/{stage}_bytes"] = float(sum(e.bytes_down + e.bytes_up
                                                         for e in exchanges))
        return exchanges

    def _setup(self, state: _Round, config: ConfigRecord, timeout: float) -> None:
        plan = json.dumps(state.plan.as_record())
        requests = {n: RecordDict({"config": config, SECAGG_KEY: ConfigRecord(
            {"stage": "setup", "round": state.number, "plan-json": plan, "keys": state.keys})})
            for n in state.neighbours}
        for e in self._exchange(state, "setup", requests, timeout):
            _parse(e, lambda x: _publics(x, state))

    def _share(self, state: _Round, timeout: float) -> None:
        requests = {}
        for n in state.alive():
            group = sorted(state.neighbours[n] & set(state.publics))
            requests[n] = RecordDict({SECAGG_KEY: ConfigRecord({
                "stage": "share_keys", "round": state.number, "nodes": group,
                "public-keys": [k for m in group for k in state.publics[m]]})})
        state.inbox = {n: [] for n in requests}
        for e in self._exchange(state, "share_keys", requests, timeout):
            _parse(e, lambda x: _forward(x, state))

    def _collect(self, state: _Round, messages: dict[int, Message], timeout: float) -> None:
        requests = {}
        for n in state.alive():
            content = RecordDict(dict(messages[n].content.items()))
            inbox = sorted(state.inbox.get(n, []))
            content[SECAGG_KEY] = ConfigRecord({
                "stage": "collect", "round": state.number, "senders": [s for s, _ in inbox],
                "ciphertexts": [c for _, c in inbox]})
            requests[n] = content
        filters = (missing_reply, error_reply, reply_size, read_metrics, keep_ledger, declined,
                   straggler)
        for e in self._exchange(state, "collect", requests, timeout, filters):
            _parse(e, lambda x: _vector(x, state))

    def _unmask(self, state: _Round, timeout: float) -> None:
        delivered = set(state.vectors)
        requests = {}
        for n in sorted(delivered):
            held = {s for s, _ in state.inbox.get(n, [])}  # whose shares n holds
            requests[n] = RecordDict({SECAGG_KEY: ConfigRecord({
                "stage": "unmask", "round": state.number,
                "survived": sorted((held | {n}) & delivered),
                "dropped": sorted(held - delivered)})})
        collected = {n: state.last[n] for n in delivered}
        for e in self._exchange(state, "unmask", requests, timeout):
            _parse(e, lambda x: _shares(x, requests, state))
        state.last.update(collected)  # a client's status is its update's

    def _release(self, state: _Round, messages: list[Message], strategy: Any, cfg: Any
                 ) -> tuple[ArrayRecord, dict[str, float]] | None:
        started = time.perf_counter()
        total = _unmasked_sum(state)
        state.costs["secagg/reconstruct_s"] = time.perf_counter() - started
        weight, clipped, body = decode(total, state.plan, contributors=len(state.vectors))
        if clipped:
            log.warning("round %d: secure aggregation clipped %d coordinates at "
                        "secagg.clip_range=%g; the mean is off there. Fix: raise "
                        "secagg.clip_range", state.number, clipped, state.plan.clip)
        dp = state.plan.noise_std > 0
        global_arrays = {k: v.numpy() for k, v in messages[0].content[ARRAYS_KEY].items()}
        order = state.keys
        mean = body / len(state.vectors) if dp else \
            body * coordinate_scale(global_arrays, order) * state.plan.max_weight / weight
        new = unflatten(flatten(global_arrays, order) + mean, global_arrays, order)
        arrays = ArrayRecord({k: Array(_cast(new[k], v) if k in new else v)
                              for k, v in global_arrays.items()})
        usable = [state.last[n] for n in sorted(state.vectors)]
        metrics = _clear_metrics(usable, weight, uniform=dp)
        reply = Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}),
                        reply_to=messages[0])
        out, aggregated = strategy.aggregate_train(state.number, [reply])
        state.costs.update({"secagg/contributors": float(len(state.vectors)),
                            "secagg/clipped_coordinates": float(clipped),
                            "secagg/step": state.plan.step})
        return None if out is None else (out, dict(aggregated or {}))


def ring(nodes: list[int], shares: int, rng: random.Random) -> dict[int, set[int]]:
    """SecAgg+'s neighbourhoods: each node and the shares // 2 on each side of a seeded ring."""
    order = sorted(nodes)
    rng.shuffle(order)
    half, m = shares // 2, len(order)
    return {n: {order[(i + o) % m] for o in range(-half, half + 1)} for i, n in enumerate(order)}


def _parse(e: Exchange, read: Callable[[Exchange], None]) -> None:
    """Apply ``read`` to a usable reply; anything malformed rejects it (never the round)."""
    if not e.usable:
        return
    try:
        read(e)
    except (SecAggError, KeyError, TypeError, ValueError, IndexError) as exc:
        e.status, e.reason = "rejected", f"secure aggregation: malformed reply ({exc})"[:300]
        log.warning("client %d: %s", e.partition_id, e.reason)


def _answer(e: Exchange) -> ConfigRecord:
    return e.reply.content.config_records[SECAGG_KEY]  # type: ignore[union-attr]


def _publics(e: Exchange, state: _Round) -> None:
    keys = byte_strings(_answer(e)["public-keys"], "public keys")
    if len(keys) != 2 or any(not 0 < len(k) <= 512 for k in keys):
        raise SecAggError("two public keys expected")
    state.publics[e.node_id] = keys


def _forward(e: Exchange, state: _Round) -> None:
    answer, sender = _answer(e), e.node_id
    recipients = list(answer["recipients"])
    ciphertexts = byte_strings(answer["ciphertexts"], "ciphertexts")
    allowed = state.neighbours[sender] & set(state.publics) - {sender}
    targets = [int(r) for r in recipients]
    if len(targets) != len(ciphertexts) or len(set(targets)) != len(targets) or \
            not set(targets) <= allowed:
        raise SecAggError("shares repeated or addressed outside the client's neighbourhood")
    for r, c in zip(recipients, ciphertexts):
        if int(r) in state.inbox:
            state.inbox[int(r)].append((sender, c))


def _vector(e: Exchange, state: _Round) -> None:
    values = e.reply.content.array_records[SECAGG_VECTOR_KEY]["masked"].numpy()  # type: ignore[union-attr]
    plan = state.plan
    if values.shape != (HEADER + plan.dim,) or values.dtype.kind != "u" or \
            (values.size and int(values.max()) >= plan.modulus):
        raise SecAggError(f"a masked vector of shape {values.shape}, dtype {values.dtype}")
    state.vectors[e.node_id] = values.astype(np.uint64)


def _shares(e: Exchange, requests: dict[int, RecordDict], state: _Round) -> None:
    answer, asked = _answer(e), requests[e.node_id][SECAGG_KEY]
    owners = [int(n) for n in answer["nodes"]]
    shares = byte_strings(answer["shares"], "shares")
    if owners != list(asked["survived"]) + list(asked["dropped"]) or len(shares) != len(owners):
        raise SecAggError("the shares do not match the request")
    for owner, share in zip(owners, shares):
        kind = "seed" if owner in state.vectors else "key"
        state.shares.setdefault(owner, {"seed": [], "key": []})[kind].append(share)


def _unmasked_sum(state: _Round) -> np.ndarray:
    """The sum of the masked vectors minus every mask the shares let the server rebuild."""
    plan, top = state.plan, np.uint64(state.plan.modulus - 1)
    total = np.zeros(HEADER + plan.dim, dtype=np.uint64)
    for node in sorted(state.vectors):
        total += state.vectors[node]
        seed = secagg_keys.rebuild(state.shares.get(node, {}).get("seed", []), plan.threshold)
        total -= mask(seed, plan)
    masked_with = {n: {s for s, _ in state.inbox.get(n, [])} for n in state.vectors}
    for dead in sorted({d for peers in masked_with.values() for d in peers} - set(state.vectors)):
        secret = secagg_keys.rebuild(state.shares.get(dead, {}).get("key", []), plan.threshold)
        if secagg_keys.public_of(secret) != state.publics[dead][0]:
            raise SecAggError(f"the shares of dropped client {dead} rebuild a wrong key")
        for peer in sorted(n for n, peers in masked_with.items() if dead in peers):
            pad = mask(secagg_keys.mask_seed(secret, state.publics[peer][0]), plan)
            total = total - pad if peer > dead else total + pad
    return total & top


def _cast(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        values = np.rint(values)
    return np.array(values.astype(like.dtype), order="C")  # ascontiguousarray makes 0-d 1-d


def _clear_metrics(usable: list[Exchange], weight: int, *, uniform: bool) -> MetricRecord:
    """The contributors' metrics averaged (by examples, or equally under DP)."""
    records = []
    for e in usable:
        metrics = MetricRecord({k: float(v) for k, v in e.metrics.items()})
        metrics[NUM_EXAMPLES_KEY] = 1 if uniform else int(e.num_examples)
        records.append(RecordDict({METRICS_KEY: metrics}))
    out = aggregate_metrics(records, NUM_EXAMPLES_KEY) if records else MetricRecord()
    out[NUM_EXAMPLES_KEY] = int(weight)
    return out
