"""Translation between fedimg objects and Flower records.

This is the one module where kebab-case keys live (Flower's convention inside
records): the run config travels as canonical JSON under ``fedimg-config`` in each
message's ConfigRecord, next to Flower's own ``server-round`` and FedProx's
``proximal-mu``. Model weights travel as an ArrayRecord built from a torch state
dict; :func:`record_to_state_dict` validates an incoming record against the model
it will be loaded into (keys, shapes, finiteness) and restores the model's dtypes,
since Flower's weighted averaging turns integer buffers into floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedimg.config import FedimgConfig, from_json, to_json
from fedimg.data import ClientPartition
from fedimg.errors import UpdateError

CONFIG_KEY = "fedimg-config"
ROUND_KEY = "server-round"
ATTEMPT_KEY = "attempt"  # which try of a retried training round (fedimg.simulation.fleet draws afresh)
PROXIMAL_MU_KEY = "proximal-mu"
# ArrayRecord {param: array}: added to each trained parameter's gradient (SCAFFOLD c - c_i,
# FedDyn -g_k; fedimg.serverapp.drift_strategies)
GRAD_OFFSET_KEY = "fedimg-grad-offset"
NUM_EXAMPLES_KEY = "num-examples"  # Flower's default weighting key
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
DECLINED_KEY = "declined"  # ConfigRecord {"reason": ...} of a client that refused to train
COMPRESSION_KEY = "fedimg-compression"  # ConfigRecord {"codec": ...}: arrays are compressed
LEDGER_KEY = "fedimg-privacy-ledger"  # ConfigRecord {"json": ...}: a client's DP accountant
SECAGG_KEY = "fedimg-secagg"  # ConfigRecord: a SecAgg+ stage's request or reply (fedimg.privacy.secagg)
SECAGG_VECTOR_KEY = "fedimg-secagg-vector"  # ArrayRecord {"masked": uint}: a masked contribution
SITE_KEY = "fedimg-site"  # ConfigRecord {"name", "location"}: a deployed site's describe reply
# fl.head_init=ridge (fedimg.serverapp.head_init): the query's action, and its reply's
# ArrayRecord {"gram": (D+1, D+1), "moment": (D+1, K)} float64 feature sums
HEAD_STATS_ACTION = "head_statistics"
HEAD_STATS_KEY = "fedimg-head-statistics"
# train.class_weighting=federated (fedimg.serverapp.class_counts): the federation's class
# counts, ArrayRecord {"counts": (K,) int64}, sent with every message; and a deployed
# site's own counts, the same record in its describe reply.
CLASS_COUNTS_KEY = "fedimg-class-counts"
# A client's per-class validation counts ("val/count/support/<c>", "val/count/hits/<c>"):
# summed across clients (fedimg.serverapp.round_record), never averaged.
COUNT_KEY = "/count/"  # fedimg.training.metrics.COUNT_PREFIX under "val/"
# Simulation only: every client's share of the pooled data ({"sizes", "indices"}) and the
# address book ({"nodes"}: the node id of each client), sent with every message.
PARTITION_KEY = "fedimg-partition"
# Simulation only (sim.cohort_size > 1, fedimg.serverapp.cohorts): a training message to one
# node that stands for several clients names them in this ConfigRecord ({"partitions": [pid,
# ...], "nodes": ["node id", ...]}, node ids as text: they are uint64). Its reply holds each
# member i's records under member_key(i, name): "arrays" and "metrics" as a lone client's
# reply has them, or "error" (ConfigRecord {"code", "reason"}) for a member that failed.
COHORT_KEY = "fedimg-cohort"
MEMBER_ERROR = "error"


MEMBER_RAISED = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)  # a member's exception (as Flower's)
MemberReply = Union[RecordDict, tuple[int, str]]  # a member's reply content, or (code, reason)


def member_key(index: int, name: str) -> str:
    """The key of cohort member ``index``'s record ``name`` in a cohort reply."""
    return f"{COHORT_KEY}-{index}-{name}"


def cohort_record(partitions: Sequence[int], nodes: Sequence[int]) -> ConfigRecord:
    """The members of a cohort message: their client ids and node ids, in order."""
    return ConfigRecord({"partitions": [int(p) for p in partitions],
                         "nodes": [str(n) for n in nodes]})


def cohort_partitions(content: RecordDict) -> list[int] | None:
    """The client ids a cohort message stands for; None for a lone client's message."""
    record = content.config_records.get(COHORT_KEY)
    if record is None:
        return None
    pids = record.get("partitions")
    if not isinstance(pids, list) or not pids or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in pids):
        raise UpdateError(f"malformed '{COHORT_KEY}' record: 'partitions' must be a "
                          f"non-empty list of client ids, got {str(pids)[:80]}")
    return list(pids)


def cohort_reply(replies: Sequence[MemberReply]) -> RecordDict:
    """One RecordDict holding every member's reply records (or error) under member keys."""
    content = RecordDict()
    for i, reply in enumerate(replies):
        if isinstance(reply, tuple):
            code, reason = reply
            content[member_key(i, MEMBER_ERROR)] = ConfigRecord({"code": int(code),
                                                                 "reason": str(reason)})
            continue
        for name, record in reply.items():
            content[member_key(i, name)] = record
    return content


def head_stats_content(gram: torch.Tensor, moment: torch.Tensor, count: int) -> RecordDict:
    """A client's reply to the ridge head's query: its feature sums and image count
    (read back, and checked, by :mod:`fedimg.serverapp.head_init`)."""
    arrays = ArrayRecord({"gram": Array(gram.numpy()), "moment": Array(moment.numpy())})
    return RecordDict({HEAD_STATS_KEY: arrays,
                       METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: int(count)})})


def state_dict_to_record(state: Mapping[str, torch.Tensor], *,
                         omit: frozenset[str] = frozenset()) -> ArrayRecord:
    """Model weights (parameters and buffers) as a Flower ArrayRecord, without ``omit``."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items() if k not in omit})


def record_bytes(record: ArrayRecord) -> int:
    """Payload size of an ArrayRecord in bytes (what travels on the wire)."""
    return sum(len(array.data) for array in record.values())


def check_arrays(arrays: Mapping[str, np.ndarray], reference: Mapping[str, torch.Tensor],
                 *, exact_dtypes: bool = False) -> None:
    """Raise UpdateError unless ``arrays`` match ``reference`` in keys and shapes and are finite.

    With ``exact_dtypes`` (a client's update, which is its model's state dict) every
    array must also have the model's dtype; aggregates are exempt, since Flower's
    weighted mean turns integer buffers into floats.
    """
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise UpdateError(f"update keys do not match the model: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    for key, ref in reference.items():
        arr = arrays[key]
        if tuple(arr.shape) != tuple(ref.shape):
            raise UpdateError(f"update '{key}' has shape {tuple(arr.shape)}, the model "
                              f"expects {tuple(ref.shape)}")
        expected = torch.empty(0, dtype=ref.dtype).numpy().dtype
        if exact_dtypes and arr.dtype != expected:
            raise UpdateError(f"update '{key}' has dtype {arr.dtype}, the model expects "
                              f"{expected}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UpdateError(f"update '{key}' contains NaN or Inf")


def record_to_state_dict(record: ArrayRecord,
                         reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validated state dict from ``record``, cast to the dtypes of ``reference``."""
    return arrays_to_state_dict({k: v.numpy() for k, v in record.items()}, reference)


def arrays_to_state_dict(arrays: Mapping[str, np.ndarray],
                         reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validated state dict from ``arrays``, cast to the dtypes of ``reference``."""
    check_arrays(arrays, reference)
    return {k: torch.from_numpy(np.asarray(arrays[k])).to(reference[k].dtype)
            for k in reference}


def config_record(cfg: FedimgConfig, **extra: int | float | str | bool) -> ConfigRecord:
    """The ConfigRecord sent with every message: the run config plus ``extra``."""
    record = ConfigRecord({CONFIG_KEY: to_json(cfg)})
    for key, value in extra.items():
        record[key.replace("_", "-")] = value
    return record


def config_from_record(record: ConfigRecord) -> FedimgConfig:
    """Inverse of :func:`config_record` for the run config."""
    if CONFIG_KEY not in record:
        raise UpdateError(f"message carries no '{CONFIG_KEY}': it was not sent by a "
                          "fedimg ServerApp")
    return from_json(str(record[CONFIG_KEY]))


def metric_record(metrics: Mapping[str, float], *, num_examples: int) -> MetricRecord:
    """MetricRecord with Flower's weighting key and finite-or-NaN floats."""
    record = MetricRecord({NUM_EXAMPLES_KEY: int(num_examples)})
    for key, value in metrics.items():
        record[key] = float(value)
    return record


def reply_content(*, metrics: MetricRecord, arrays: ArrayRecord | None = None) -> RecordDict:
    """The RecordDict of a client's reply."""
    content = RecordDict({METRICS_KEY: metrics})
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    return content


def nan_weighted_mean(values: list[float], weights: list[float]) -> float:
    """Weighted mean over the finite values only (NaN if there are none)."""
    pairs = [(v, w) for v, w in zip(values, weights) if not math.isnan(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else float("nan")


def aggregate_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Flower metric aggregator: example-weighted mean that skips NaN values.

    Flower's default (``aggregate_metricrecords``) lets one client's NaN (e.g. AUC on
    a validation split holding a single class) turn the whole average into NaN.
    """
    metric_records = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(m[weighting_key]) for m in metric_records]
    keys = [k for k in metric_records[0] if k != weighting_key] if metric_records else []
    return MetricRecord({
        key: nan_weighted_mean([float(m[key]) for m in metric_records], weights)
        for key in keys
    })


def split_counts(message: Message) -> dict[str, float]:
    """Take the per-class validation counts (``val/count/*``) out of ``message``'s metric
    records, in place, and return them.

    They name the classes a client holds, so under label skew they differ between
    clients: averaged, compared or handed to Flower's aggregation (which refuses replies
    whose keys differ) they would be wrong. The server reads them once, where a reply's
    metrics are read (:func:`fedimg.serverapp.filters.read_metrics`), and only the round
    record sums them (:func:`fedimg.serverapp.round_record.pooled_validation`).
    """
    counts: dict[str, float] = {}
    for record in message.content.metric_records.values():
        for key in [k for k in record if isinstance(k, str) and COUNT_KEY in k]:
            value = record.pop(key)
            counts[key] = value  # type: ignore[assignment]  # checked where summed
    return counts


def partitions_record(partitions: list[ClientPartition],
                      nodes: Mapping[int, int] | None = None) -> ArrayRecord:
    """Every client's partition in one ArrayRecord (index arrays back to back + sizes).

    ``nodes`` (node id -> client id), when given, travels as the address book: a
    simulated node learns which client it is from it (:func:`client_of_node`).
    """
    sizes = np.array([[len(p.train_indices), len(p.val_indices)] for p in partitions],
                     dtype=np.int64).reshape(-1, 2)
    flat = [np.asarray(i, dtype=np.int64) for p in partitions
            for i in (p.train_indices, p.val_indices)]
    indices = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
    record = ArrayRecord({"sizes": Array(sizes), "indices": Array(indices)})
    if nodes:
        book = np.zeros(len(partitions), dtype=np.uint64)
        for node, cid in nodes.items():
            book[cid] = node
        record["nodes"] = Array(book)
    return record


def client_of_node(record: ArrayRecord, node_id: int) -> int | None:
    """The client id the address book in a partitions record gives ``node_id``, if any."""
    if "nodes" not in record:
        return None
    try:
        book = record["nodes"].numpy().astype(np.uint64).reshape(-1)
    except (ValueError, TypeError) as exc:
        raise UpdateError(f"malformed '{PARTITION_KEY}' address book: {exc}") from exc
    found = np.flatnonzero(book == np.uint64(node_id))
    return int(found[0]) if len(found) == 1 else None


def partitions_from_record(record: ArrayRecord) -> list[ClientPartition]:
    """Inverse of :func:`partitions_record`; UpdateError if it is malformed."""
    try:
        sizes = record["sizes"].numpy().astype(np.int64).reshape(-1, 2)
        indices = record["indices"].numpy().astype(np.int64).reshape(-1)
    except (KeyError, ValueError, TypeError) as exc:
        raise UpdateError(f"malformed '{PARTITION_KEY}' record: {exc}") from exc
    if (sizes < 0).any() or int(sizes.sum()) != len(indices):
        raise UpdateError(f"malformed '{PARTITION_KEY}' record: sizes add up to "
                          f"{int(sizes.sum())}, but it holds {len(indices)} indices")
    bounds = np.concatenate([[0], np.cumsum(sizes.reshape(-1))])
    return [ClientPartition(cid, indices[bounds[2 * cid]:bounds[2 * cid + 1]],
                            indices[bounds[2 * cid + 1]:bounds[2 * cid + 2]])
            for cid in range(len(sizes))]


def counts_record(counts: np.ndarray) -> ArrayRecord:
    """The run-context record of ``counts`` (also a site's own, in its describe reply)."""
    return ArrayRecord({"counts": Array(np.asarray(counts, dtype=np.int64))})


def counts_from_record(content: RecordDict, *, num_classes: int) -> np.ndarray:
    """The (K,) counts in ``content[CLASS_COUNTS_KEY]``; ValueError naming what is wrong."""
    if CLASS_COUNTS_KEY not in content.array_records:
        raise ValueError(f"no '{CLASS_COUNTS_KEY}' record")
    try:
        raw = content.array_records[CLASS_COUNTS_KEY]["counts"].numpy()
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed '{CLASS_COUNTS_KEY}' record ({exc})") from exc
    if raw.shape != (num_classes,) or raw.dtype.kind not in "iu":
        raise ValueError(f"class counts of shape {raw.shape} and dtype {raw.dtype}; the run "
                         f"has {num_classes} classes (int64 counts)")
    if (raw < 0).any() or raw.sum() <= 0:
        raise ValueError(f"class counts {raw.tolist()[:10]} are negative or all zero")
    return raw.astype(np.int64)
