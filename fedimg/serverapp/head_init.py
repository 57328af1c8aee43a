"""Before round 1: the global head in closed form from every client's feature sums.

``fl.head_init=ridge`` runs Fed3R (Fanì et al. 2024, "Accelerating Heterogeneous
Federated Learning with Closed-form Classifiers"; the maths is in
:mod:`fedimg.training.closed_form`). The server sends the initial model to every
client in one ``query.head_statistics`` message; each answers with the sums ``G_k``
and ``M_k`` of its training images' head features. Their sum is what pooled images
would give, so the ridge head solved from it does not depend on how the images are
spread: a fleet whose cameras each hold one class gets the head that central
training of the same head would. The rounds then fine-tune from there.

A reply is checked before it counts: the shapes of the model's head (before its
arrays are decoded), finite values below a per-image bound, a symmetric Gram with a
non-negative diagonal, and counts that agree with each other and with the client's
known training size (``G[-1, -1] = n``, ``M[-1]`` sums to ``n``: the appended constant
feature). Then each batch's Grams must add up to a positive semi-definite sum, so the
server's solve cannot fail; where they do not, each is factorised and those that are
not semi-definite are left out. A reply that fails is left out with a warning naming
the client, like a rejected update; fewer usable replies than ``fl.min_replies`` stop
the run before round 1.

The server holds a batch of replies at once (:meth:`Transport.exchange` returns them
together), so the query goes to the nodes in batches whose replies fit in
``MAX_REPLY_BYTES`` and each batch is added up before the next is sent: for a fleet of
1000 cameras with Lite0's head (13 MB of sums each) the server holds 20 replies at a
time, not 13 GB of them. Batches follow the client order, so the float sums are the
same as in one batch. In simulation with ``sim.cohort_size`` > 1, a batch's queries go
out as cohorts (:mod:`fedimg.serverapp.cohorts`): one message, one model load and one
worker call for several small clients, each member's sums still a reply of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Message, RecordDict

from fedimg.build import PreparedRun
from fedimg.config import FedimgConfig
from fedimg.errors import FedimgError
from fedimg.models import MODELS
from fedimg.serverapp.cohorts import group, split
from fedimg.serverapp.validation import UpdateChecks
from fedimg.training.closed_form import HeadStatistics, ridge_head
from fedimg.transport.grid import Exchange, Transport, error_summary
from fedimg.transport.packing import unpack_content
from fedimg.transport.records import (
    ARRAYS_KEY,
    HEAD_STATS_ACTION,
    HEAD_STATS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    config_record,
    state_dict_to_record,
)

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 2**28  # the replies of one batch, held until its last arrives
MAX_FEATURE_ENERGY = 1e12  # |G|, |M| per image: far above any network's features, finite sums


def fit_ridge_head(prepared: PreparedRun, transport: Transport, checks: UpdateChecks) -> None:
    """Replace the head of ``prepared.initial_state`` by the clients' ridge solution."""
    started, cfg = time.perf_counter(), prepared.cfg
    weight_key = f"{MODELS.get(cfg.model).head}.weight"
    content = RecordDict({"config": config_record(prepared.client_cfg),
                          ARRAYS_KEY: state_dict_to_record(prepared.initial_state),
                          **prepared.context(transport.node_to_partition)})
    total, used = collect_statistics(
        transport, content, head_shape=tuple(prepared.initial_state[weight_key].shape),
        expected_sizes=checks.expected_sizes, timeout=cfg.fl.timeout_s,
        min_replies=cfg.fl.min_replies,
        cohort_size=cfg.sim.cohort_size if prepared.partitions else 1)
    prepared.initial_state.update(ridge_head_state(cfg, total))
    log.info("ridge head from %d clients (%d images) in %.1fs", used, total.count,
             time.perf_counter() - started)


def ridge_head_state(cfg: FedimgConfig, stats: HeadStatistics) -> dict[str, torch.Tensor]:
    """The head's weight and bias, under the model's state-dict names, solved from ``stats``
    (also the baselines' in-process head: :mod:`fedimg.baselines`)."""
    head = MODELS.get(cfg.model).head
    weight, bias = ridge_head(stats, relative_lambda=cfg.fl.ridge_lambda)
    return {f"{head}.weight": weight, f"{head}.bias": bias}


def collect_statistics(transport: Transport, content: RecordDict, *,
                       head_shape: tuple[int, ...], expected_sizes: Mapping[int, int],
                       timeout: float, min_replies: int, cohort_size: int = 1
                       ) -> tuple[HeadStatistics, int]:
    """Every node's feature sums, added up, and how many replies counted (queries merged
    into cohorts of ``cohort_size`` clients; 1: one message each).

    Raises :class:`FedimgError` before round 1 when fewer than ``min_replies`` count.
    """
    classes, features = head_shape
    nodes = transport.node_ids()
    total: HeadStatistics | None = None
    used, problems = 0, []
    for batch in reply_batches(nodes, dim=features + 1, classes=classes):
        messages = [Message(content=content, message_type=f"query.{HEAD_STATS_ACTION}",
                            dst_node_id=node) for node in batch]
        sent = group(messages, cohort_size, partition_of=transport.partition_of,
                     kinds=(f"query.{HEAD_STATS_ACTION}",))
        kept = []
        for exchange in split(transport.exchange(sent.messages, timeout=timeout), sent):
            pid = exchange.partition_id
            stats = _statistics(exchange, dim=features + 1, classes=classes,
                                expected=expected_sizes.get(pid))
            if isinstance(stats, str):
                _leave_out(pid, stats, problems)
            else:
                kept.append((pid, stats))
        for _, stats in _semidefinite(kept, problems):
            total, used = stats if total is None else total + stats, used + 1
    if total is None or used < min_replies:
        raise FedimgError(f"fl.head_init=ridge: {used} usable replies of {len(nodes)}, "
                          f"fl.min_replies={min_replies}; " + "; ".join(problems[:5])
                          + ". Fix the clients, or run with fl.head_init=none")
    return total, used


def reply_batches(nodes: list[int], *, dim: int, classes: int,
                  limit: int | None = None) -> list[list[int]]:
    """``nodes`` in order, cut into batches whose float64 sums fit in ``limit`` bytes
    (default ``MAX_REPLY_BYTES``). Refuses, before sending, a head whose single reply
    would not fit.
    """
    limit = MAX_REPLY_BYTES if limit is None else limit
    per_reply = dim * (dim + classes) * 8
    if per_reply > limit:
        raise FedimgError(f"fl.head_init=ridge: one client's feature sums ({dim}x{dim} "
                          f"float64) need {per_reply / 2**30:.1f} GiB at the server, over "
                          f"the {limit / 2**30:.2f} GiB limit. Fix: a model with a smaller "
                          "head input, or fl.head_init=none")
    size = limit // per_reply
    return [nodes[i:i + size] for i in range(0, len(nodes), size)]


def _statistics(exchange: Exchange, *, dim: int, classes: int,
                expected: int | None) -> HeadStatistics | str:
    """A reply's feature sums, or the line saying why they are unusable."""
    reply = exchange.reply
    if reply is None:
        return "no reply before fl.timeout_s"
    if reply.has_error():
        return error_summary(str(reply.error.reason))
    try:
        content = unpack_content(reply.content)
        arrays = content.array_records[HEAD_STATS_KEY]
        shapes = tuple(arrays[k].shape for k in ("gram", "moment"))
        if shapes != ((dim, dim), (dim, classes)):  # before decoding a byte of them
            return (f"shapes {shapes[0]} and {shapes[1]}, the head needs ({dim}, {dim}) "
                    f"and ({dim}, {classes})")
        gram = np.asarray(arrays["gram"].numpy(), dtype=np.float64).reshape(dim, dim)
        moment = np.asarray(arrays["moment"].numpy(), dtype=np.float64).reshape(dim, classes)
        count = int(content.metric_records[METRICS_KEY][NUM_EXAMPLES_KEY])
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        return f"malformed reply ({type(exc).__name__}: {str(exc)[:200]})"
    problem = _check(gram, moment, count, dim=dim, classes=classes, expected=expected)
    if problem:
        return problem
    return HeadStatistics(torch.from_numpy(gram.copy()), torch.from_numpy(moment.copy()), count)


def _check(gram: np.ndarray, moment: np.ndarray, count: int, *, dim: int, classes: int,
           expected: int | None) -> str:
    """What is wrong with these sums ("" if nothing)."""
    g_lo, g_hi = gram.min(), gram.max()
    lo = np.minimum(g_lo, moment.min())  # NaN if any value is NaN
    hi = np.maximum(g_hi, moment.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "non-finite values"
    if max(hi, -lo) > MAX_FEATURE_ENERGY * max(count, 1):
        return f"sums larger than {MAX_FEATURE_ENERGY:.0e} per image"
    if expected is not None and count != expected:
        return f"{count} images, the client has {expected}"
    scale = max(1.0, float(np.maximum(g_hi, -g_lo)))
    if count < 1 or abs(gram[-1, -1] - count) > 1e-6 * count \
            or abs(moment[-1].sum() - count) > 1e-6 * count \
            or not np.allclose(moment[-1], np.round(moment[-1]), atol=1e-6) \
            or (moment[-1] < 0).any():
        return f"sums inconsistent with {count} images"
    if _asymmetry(gram) > 1e-9 * scale or (np.diagonal(gram) < 0).any():
        return "a Gram matrix that is not symmetric with a non-negative diagonal"
    return ""


def _asymmetry(gram: np.ndarray, block: int = 128) -> float:
    """``max |G - G^T|``, block by block: ``gram - gram.T`` reads one operand column-wise
    (17 ms for Lite0's 1282x1282 Gram, against 4 ms in 128x128 blocks)."""
    worst, n = 0.0, gram.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            worst = max(worst, float(np.abs(gram[i:i + block, j:j + block]
                                            - gram[j:j + block, i:i + block].T).max()))
    return worst


def _semidefinite(kept: list[tuple[int, HeadStatistics]], problems: list[str]
                  ) -> list[tuple[int, HeadStatistics]]:
    """The replies of a batch whose Grams add up to a positive semi-definite sum.

    A sum of ``phi phi^T`` is positive semi-definite, and so is a sum of such sums: the
    server's ridge solve then cannot fail. One factorisation of the batch's sum checks
    that (one per batch of replies, not one per reply: 0.09 s each for Lite0's head).
    Only when it fails is each reply factorised, and those that fail are left out.
    """
    if not kept or _factorises(sum((s.gram for _, s in kept[1:]), kept[0][1].gram)):
        return kept
    good = []
    for pid, stats in kept:
        if _factorises(stats.gram):
            good.append((pid, stats))
        else:
            _leave_out(pid, "a Gram matrix that is not positive semi-definite", problems)
    return good


def _factorises(gram: torch.Tensor) -> bool:
    """Whether ``gram`` plus a jitter far below the ridge penalty has a Cholesky factor."""
    jitter = 1e-9 * max(float(torch.diagonal(gram).mean()), 1e-300)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return int(torch.linalg.cholesky_ex(gram + jitter * eye).info) == 0


def _leave_out(pid: int, reason: str, problems: list[str]) -> None:
    problems.append(f"client {pid}: {reason}")
    log.warning("head statistics of client %d left out: %s", pid, reason)
