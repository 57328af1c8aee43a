"""What a round record says about the clients: fairness, pooled validation, device time,
bytes, statuses.

Pure functions over a round's :class:`~fedimg.transport.grid.Exchange` list. The
aggregated metrics (``train/*``, ``val/*``) are not recomputed here: they are the
strategy's own aggregates (Flower's), computed once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import MessageType

from fedimg.training.metrics import pooled_balanced_accuracy
from fedimg.transport.grid import Exchange
from fedimg.transport.records import COUNT_KEY

log = logging.getLogger(__name__)


def fairness(exchanges: list[Exchange], metric: str = "val/accuracy") -> dict[str, float]:
    """How evenly the global model serves the clients that evaluated it this round.

    Worst client, 10th percentile (linear interpolation), spread (best - worst) and
    standard deviation of ``metric`` over the clients' own validation splits (or, for
    ``test/personal/*``, their personalised models on their own site's test rows), the
    client-level view of fairness in federated learning (Li et al. 2020, "Fair
    Resource Allocation in Federated Learning"). Empty if no client evaluated.
    """
    # In partition order, not arrival order: the float sums are then the same in every
    # run with the same seed (a resumed one included).
    ordered = sorted(exchanges, key=lambda e: e.partition_id)
    values = np.array([e.metrics[metric] for e in ordered
                       if e.phase == MessageType.EVALUATE and e.status == "ok"
                       and metric in e.metrics], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    name = metric.split("/", 1)[-1] if metric.startswith("val/") else metric.replace("/", "_")
    return {f"fair/worst_{name}": float(values.min()),
            f"fair/p10_{name}": float(np.percentile(values, 10)),
            f"fair/spread_{name}": float(values.max() - values.min()),
            f"fair/std_{name}": float(values.std())}


POOLED_METRIC = "val/pooled_balanced_accuracy"


def pooled_validation(exchanges: list[Exchange]) -> dict[str, float]:
    """``val/pooled_balanced_accuracy``: the evaluating clients' per-class counts summed.

    The strategy's ``val/balanced_accuracy`` is the example-weighted mean of each
    client's own balanced accuracy. A site holding one image of a class swings its own
    score by half with that image; summed counts weigh it as one image among all. A
    client's counts are used only if they are whole, non-negative, hits within support,
    and add up to its validation size; otherwise they are left out with a warning.
    Empty when no client sent usable counts.
    """
    usable = []
    for e in sorted(exchanges, key=lambda e: e.partition_id):
        if e.phase != MessageType.EVALUATE or e.status != "ok":
            continue
        counts = {k.removeprefix("val/"): v for k, v in e.class_counts.items()
                  if k.startswith("val" + COUNT_KEY)}
        if counts and _counts_ok(counts, e.num_examples):
            usable.append(counts)
        elif counts:
            log.warning("client %s: its per-class validation counts do not add up; left "
                        "out of %s", e.partition_id, POOLED_METRIC)
    return {POOLED_METRIC: pooled_balanced_accuracy(usable)} if usable else {}


def _counts_ok(counts: dict[str, float], num_examples: int) -> bool:
    values = np.array(list(counts.values()), dtype=np.float64)
    if not (np.isfinite(values).all() and (values >= 0).all()
            and (values == np.round(values)).all()):
        return False
    support = {k.rsplit("/", 1)[1]: v for k, v in counts.items() if "/support/" in k}
    hits = {k.rsplit("/", 1)[1]: v for k, v in counts.items() if "/hits/" in k}
    return (set(hits) <= set(support) and len(hits) + len(support) == len(counts)
            and all(hits[c] <= support[c] for c in hits)
            and sum(support.values()) == num_examples)


def device_time(exchanges: list[Exchange], deadline_s: float | None) -> dict[str, float]:
    """The round's length on the simulated devices (``hetero.*``): its slowest used reply.

    A round that lost a straggler lasted until the deadline. Empty when no client
    reported device time (heterogeneity off).
    """
    trained = [e for e in exchanges if e.phase == MessageType.TRAIN]
    times = [e.metrics["fleet/device_s"] for e in trained
             if e.status == "ok" and "fleet/device_s" in e.metrics]
    if not times and not any(e.status == "straggler" for e in trained):
        return {}
    cut = deadline_s is not None and any(e.status == "straggler" for e in trained)
    return {"fleet/round_s": float(deadline_s) if cut else max(times)}


def clients(exchanges: list[Exchange]) -> dict[str, dict[str, Any]]:
    """Per client: bytes, its train and val metrics, its update norm, and any status."""
    out: dict[str, dict[str, Any]] = {}
    for e in exchanges:
        entry = out.setdefault(str(e.partition_id), {"bytes/down": 0, "bytes/up": 0})
        entry["bytes/down"] += e.bytes_down
        entry["bytes/up"] += e.bytes_up
        phase = "train" if e.phase == MessageType.TRAIN else "val"
        entry[phase] = {**e.metrics, "num_examples": e.num_examples}
        if e.update_norm == e.update_norm:
            entry["update_norm"] = e.update_norm
        if e.status != "ok":
            entry[f"{phase}_status"] = f"{e.status}: {e.reason}"
        else:  # a retried round: the attempt that counted
            entry.pop(f"{phase}_status", None)
    return out


def counts(exchanges: list[Exchange]) -> dict[str, int]:
    """How many clients were sampled, aggregated, failed, rejected, declined, absent."""
    trained = [e for e in exchanges if e.phase == MessageType.TRAIN]
    return {"fleet/sampled": len(trained),
            "fleet/ok": sum(e.status == "ok" for e in trained),
            "fleet/failed": sum(e.status in ("failed", "timeout") for e in exchanges),
            "fleet/rejected": sum(e.status == "rejected" for e in exchanges),
            "fleet/declined": sum(e.status == "declined" for e in exchanges),
            **{f"fleet/{s}": sum(e.status == s for e in trained)
               for s in ("offline", "dropped", "straggler")}}


def exchange_summary(exchanges: list[Exchange], *, deadline_s: float | None) -> dict[str, Any]:
    """Everything a round record says about its exchanges (``clients`` included)."""
    return {**fairness(exchanges), **fairness(exchanges, "val/personal_accuracy"),
            **pooled_validation(exchanges),
            **fairness(exchanges, "test/personal/balanced_accuracy"),  # worst site (fl.personal)
            **device_time(exchanges, deadline_s),
            "bytes/down": sum(e.bytes_down for e in exchanges),
            "bytes/up": sum(e.bytes_up for e in exchanges),
            **counts(exchanges), "clients": clients(exchanges)}
