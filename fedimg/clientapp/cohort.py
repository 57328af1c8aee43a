"""A cohort message: several small clients of one round, trained together (``sim.cohort_size``).

The server merges a round's small training clients into cohorts, one message each
(:mod:`fedimg.serverapp.cohorts`). For every member this module does what the train
handler does for a lone client, in the same order: the injected fault
(``faults.raise_at``), the simulated device (:mod:`fedimg.clientapp.conditions`: an
offline member answers as an offline client, a dropping one runs its steps and
fails), then the round's inputs exactly as :meth:`TaskEnvironment.train` prepares
them (the seed of (run, round, client), the loader's epoch, the scheduled learning
rate, the frozen trunk's cached features when they serve training). The members are
then trained from the global weights by
:func:`~fedimg.training.vector_rule.train_clients`: vectorised where this process's
:attr:`TaskEnvironment.vectorize_rule` measured that faster, else one by one, to the
same result either way (float tolerance). Each member's reply is a lone client's:
its whole state dict, its ``train/*`` metrics and learning rate, its example count
and, under ``hetero.*``, its device time; its arrays are packed if the server packed
its own (``fl.pack_arrays``), and ``fedimg.transport.records.cohort_reply`` puts it
under member keys.

Differences from lone clients, by design: ``train/seconds`` and ``fleet/compute_s``
are the member's share of its group's training time; a member whose loss stops being
finite, or a ``faults.kill_at`` member (it kills the worker), fails its whole cohort.
What a cohort cannot do (privacy, FedBN, compression, secure aggregation, attacks,
per-client arrays, a real clock) is refused with the config (``fedimg.config.checks``,
``fedimg.resolve``); a message that still carries anything per client is refused here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedimg.clientapp.conditions import device_conditions, pace
from fedimg.clientapp.environment import TaskEnvironment
from fedimg.clientapp.frozen_home import home_keys
from fedimg.clientapp.site import SiteOptions
from fedimg.config import TrainConfig
from fedimg.data import InMemoryLoader
from fedimg.errors import UpdateError
from fedimg.seeds import derive_seed
from fedimg.simulation import fleet
from fedimg.simulation.attacks import poisoned_update
from fedimg.simulation.faults import inject_fault
from fedimg.training.vector_rule import train_clients
from fedimg.training.vectorized import ClientJob, ClientOutcome
from fedimg.transport.grid import content_bytes
from fedimg.transport.packing import PACKED_ARRAYS_KEY, pack_content
from fedimg.transport.records import (
    ARRAYS_KEY,
    ATTEMPT_KEY,
    GRAD_OFFSET_KEY,
    LEDGER_KEY,
    MEMBER_RAISED,
    METRICS_KEY,
    PROXIMAL_MU_KEY,
    ROUND_KEY,
    MemberReply,
    head_stats_content,
    metric_record,
    reply_content,
    state_dict_to_record,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Round:
    """One member's round as :meth:`TaskEnvironment.train` would run it."""

    partition_id: int
    model: nn.Module  # the whole model, or the tail over cached trunk features
    job: ClientJob
    cfg: TrainConfig
    lr: float
    num_examples: int


def train_cohort(env: TaskEnvironment, partitions: Sequence[int], *,
                 config: Mapping[str, Any], start: Mapping[str, torch.Tensor],
                 message: Any, site: SiteOptions | None) -> list[MemberReply]:
    """Each member's reply content (or its error) for a cohort ``message`` (its content).

    ``env`` holds the global weights ``start``, and holds them again on return.
    """
    _check_shared(message, site)
    server_round, attempt = int(config[ROUND_KEY]), int(config.get(ATTEMPT_KEY, 1))
    replies: list[MemberReply | None] = [None] * len(partitions)
    ready: list[tuple[int, fleet.ClientConditions | None]] = []
    for i, pid in enumerate(partitions):
        try:
            inject_fault(env.cfg, server_round, pid)
            ready.append((i, device_conditions(env, pid, server_round, attempt)))
        except fleet.DeviceAbsent as exc:  # as a lone client's error reply
            replies[i] = (fleet.ABSENT_CODE, str(exc))
        except Exception as exc:  # noqa: BLE001 - a lone client's exception fails it alone
            log.warning("cohort member %d failed: %s", pid, exc)
            replies[i] = (MEMBER_RAISED, f"{type(exc).__name__}: {exc}")
    env.load_state(start)  # a dropping member trained part of its round
    rounds = [_member_round(env, partitions[i], server_round=server_round) for i, _ in ready]
    outcomes = _train(env, rounds, proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)))
    for (i, cond), member, outcome in zip(ready, rounds, outcomes, strict=True):
        replies[i] = _member_reply(env, member, outcome, start=start, cond=cond,
                                   bytes_down=content_bytes(message))
    env.load_state(start)
    if PACKED_ARRAYS_KEY in message.array_records:  # as the server packed its own arrays
        replies = [r if isinstance(r, tuple) or r is None else pack_content(r, ARRAYS_KEY)
                   for r in replies]
    assert all(r is not None for r in replies)  # every member answered or failed
    return replies  # type: ignore[return-value]


def statistics_cohort(env: TaskEnvironment, partitions: Sequence[int], *, message: Any,
                      site: SiteOptions | None) -> list[MemberReply]:
    """Each member's Fed3R feature sums (the ridge head's query before round 1), as a
    lone client's reply; a member that raises fails alone."""
    _check_shared(message, site)
    replies: list[MemberReply] = []
    for pid in partitions:
        try:
            stats = env.head_statistics(pid)
            replies.append(head_stats_content(stats.gram, stats.moment, stats.count))
        except Exception as exc:  # noqa: BLE001 - a member's failure is its own
            replies.append((MEMBER_RAISED, f"{type(exc).__name__}: {exc}"))
    return replies


def _check_shared(message: Any, site: SiteOptions | None) -> None:
    """A cohort holds only what its members share, and only a simulation sends one."""
    if site is not None:
        raise UpdateError(f"site {site.name} got a cohort message (several simulated "
                          "clients); a deployed site is one client: sim.cohort_size is "
                          "for simulation only")
    own = sorted({GRAD_OFFSET_KEY, LEDGER_KEY} & set(message.keys()))
    if own:
        raise UpdateError(f"a cohort message carries {own}, which belong to one client; "
                          "such clients are sent alone (sim.cohort_size)")


def _member_round(env: TaskEnvironment, pid: int, *, server_round: int) -> _Round:
    """What ``env.train(pid, server_round=...)`` trains, in the order it prepares it."""
    data = env.client(pid)
    model, loader, tcfg, lr = env.round_inputs(pid, tcfg=env.cfg.train,
                                               server_round=server_round)
    job = ClientJob(loader, seed=derive_seed(env.cfg.seed, server_round, pid),
                    class_weights=data.class_weights, logit_scale=data.logit_scale,
                    logit_shift=data.logit_shift)
    return _Round(pid, model, job, tcfg, lr, data.num_train)


def _train(env: TaskEnvironment, rounds: list[_Round], *,
           proximal_mu: float) -> list[ClientOutcome]:
    """Every member's outcome; members that train the same module train together."""
    groups: dict[int, list[int]] = {}
    for j, member in enumerate(rounds):
        groups.setdefault(id(member.model), []).append(j)
    outcomes: dict[int, ClientOutcome] = {}
    for js in groups.values():
        first = rounds[js[0]]
        results = train_clients(first.model, [rounds[j].job for j in js], cfg=first.cfg,
                                lr=first.lr, device=env.device,
                                batch_shape=_batch_shape(first.job.loader),
                                num_classes=env.num_classes, rule=env.vectorize_rule,
                                proximal_mu=proximal_mu)
        outcomes.update(zip(js, results, strict=True))
    return [outcomes[j] for j in range(len(rounds))]


def _batch_shape(loader: Any) -> tuple[int, ...]:
    """A full training batch's input shape (B, ...), for the rule (global RNG untouched)."""
    assert isinstance(loader, InMemoryLoader)
    with torch.random.fork_rng(devices=[]):
        one = loader.transform(loader.images[torch.from_numpy(loader.indices[:1])])
    return (loader.batch_size, *one.shape[1:])


def _member_reply(env: TaskEnvironment, member: _Round, outcome: ClientOutcome, *,
                  start: Mapping[str, torch.Tensor], cond: fleet.ClientConditions | None,
                  bytes_down: int) -> MemberReply:
    """The reply a lone client would send after training to ``outcome``."""
    env.load_state(start)
    member.model.load_state_dict(outcome.state, strict=False)  # shares env.model's tensors
    sent = poisoned_update(env.cfg, member.partition_id, start, env.state(),
                           env.trained_keys())
    metrics = {**outcome.result.as_metrics(), "train/lr": member.lr}
    reply = reply_content(metrics=metric_record(metrics, num_examples=member.num_examples),
                          arrays=state_dict_to_record(sent, omit=home_keys(env)))
    if cond is not None:
        pace(env, cond, metrics=reply[METRICS_KEY], bytes_down=bytes_down,
             bytes_up=content_bytes(reply), compute_s=outcome.result.seconds,
             steps=outcome.result.steps)
    return reply
