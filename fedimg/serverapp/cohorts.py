"""Cohorts: several small training clients in one message to one node (``sim.cohort_size``).

Flower's simulation hands a worker one message per node, one at a time, so a worker
can train many small clients together (:func:`fedimg.training.vector_rule.train_clients`)
only if one message carries them. :func:`group` merges a round's training messages
into cohorts of up to ``size`` members, in client order; each cohort is one message
to its first member's node, holding the members' shared content (the global model,
the run config, the partitions and address book) plus a ConfigRecord naming them
(:data:`~fedimg.transport.records.COHORT_KEY`). The ClientApp trains them together
(:mod:`fedimg.clientapp.cohort`) and replies with each member's records under
:func:`~fedimg.transport.records.member_key` names.

:func:`split` turns each cohort's exchange back into one :class:`Exchange` per member,
before the reply filters run, so every filter, update check, straggler rule, metric
and strategy sees exactly the per-client exchanges of a run without cohorts: each
member's reply is a lone client's reply (same records, metrics and example count),
sent from its own node. A cohort that failed (an error, no reply before the deadline)
is a failed (or missing) reply of every member, with the same reason.

**Bytes.** The model goes down once per cohort: each member is counted an equal share
of the cohort's ``bytes_down`` (the remainder to the first members), so a round's
total is what really travelled. Each member's ``bytes_up`` is its own update's.

Only messages that share one content object are merged (a strategy configures every
client with the same content); a message with content of its own (a DP ledger handed
back, a per-client correction) stays a message of its own. Evaluation is never
grouped (the round loop passes ``size=1``); ``size=1`` returns the messages and the
exchanges untouched. The ridge head's statistics query before round 1
(:mod:`fedimg.serverapp.head_init`) is grouped the same way: each member's sums come
back as a lone client's reply, checked alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Error, Message, MessageType, RecordDict

from fedimg.transport.grid import Exchange, content_bytes
from fedimg.transport.records import COHORT_KEY, MEMBER_ERROR, cohort_record, member_key


@dataclass(frozen=True)
class Member:
    """One client of a cohort: the strategy's message to it, and which client it is."""

    message: Message
    partition_id: int


@dataclass(frozen=True)
class Cohort:
    """What is sent (to the first member's node) and the members it stands for."""

    message: Message
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Grouping:
    """A round's messages as cohorts (a lone message is a cohort of one, sent as is)."""

    cohorts: tuple[Cohort, ...]

    @property
    def messages(self) -> list[Message]:
        """The messages to send: one per cohort."""
        return [c.message for c in self.cohorts]


def group(messages: Sequence[Message], size: int, *, partition_of: Callable[[int], int],
          kinds: tuple[str, ...] = (MessageType.TRAIN,)) -> Grouping:
    """``messages`` merged into cohorts of up to ``size`` members, in client order; only
    messages of a type in ``kinds`` are merged (training, or the ridge head's query)."""
    def single(m: Message) -> Cohort:
        return Cohort(m, (Member(m, partition_of(m.metadata.dst_node_id)),))

    if size <= 1:
        return Grouping(tuple(single(m) for m in messages))
    order = sorted(messages, key=lambda m: (partition_of(m.metadata.dst_node_id),
                                            m.metadata.dst_node_id))
    shared: dict[int, list[Message]] = {}
    for m in order:
        shared.setdefault(id(m.content), []).append(m)
    cohorts: list[Cohort] = []
    for run in shared.values():
        if len(run) == 1 or run[0].metadata.message_type not in kinds:
            cohorts.extend(single(m) for m in run)
            continue
        for lo in range(0, len(run), size):
            chunk = [single(m).members[0] for m in run[lo:lo + size]]
            cohorts.append(_merge(chunk) if len(chunk) > 1 else Cohort(chunk[0].message,
                                                                        tuple(chunk)))
    return Grouping(tuple(cohorts))


def _merge(members: list[Member]) -> Cohort:
    """One message to the first member's node: the shared content, and who the members are."""
    first = members[0].message
    content = RecordDict(dict(first.content.items()))  # the strategy's content is shared
    content[COHORT_KEY] = cohort_record([m.partition_id for m in members],
                                        [m.message.metadata.dst_node_id for m in members])
    message = Message(content=content, message_type=first.metadata.message_type,
                      dst_node_id=first.metadata.dst_node_id,
                      group_id=first.metadata.group_id, ttl=first.metadata.ttl)
    return Cohort(message, tuple(members))


def split(exchanges: list[Exchange], grouping: Grouping) -> list[Exchange]:
    """One exchange per member of each cohort, in client order (``exchanges`` if none)."""
    cohorts = {id(c.message): c for c in grouping.cohorts if len(c.members) > 1}
    if not cohorts:
        return exchanges
    out: list[Exchange] = []
    for e in exchanges:
        cohort = cohorts.get(id(e.sent))
        out.extend([e] if cohort is None else _member_exchanges(e, cohort))
    return sorted(out, key=lambda e: (e.partition_id, e.node_id))


def _member_exchanges(e: Exchange, cohort: Cohort) -> list[Exchange]:
    """The cohort's exchange as its members' own: their messages, replies and bytes."""
    k = len(cohort.members)
    out = []
    for i, member in enumerate(cohort.members):
        reply = _member_reply(e.reply, i, member.message)
        up = 0 if reply is None or reply.has_error() else content_bytes(reply.content)
        out.append(Exchange(phase=e.phase, partition_id=member.partition_id,
                            node_id=member.message.metadata.dst_node_id,
                            sent=member.message,
                            bytes_down=e.bytes_down // k + int(i < e.bytes_down % k),
                            reply=reply, bytes_up=up))
    return out


def _member_reply(reply: Message | None, index: int, sent: Message) -> Message | None:
    """Member ``index``'s reply, as its own node would have sent it to ``sent``.

    No reply is no reply for every member; a cohort's error is each member's error; a
    member's own error record is its error; else its records, without the member prefix
    (a member with none gets an empty reply, which the reply filters reject).
    """
    if reply is None:
        return None
    if reply.has_error():
        return Message(reply.error, reply_to=sent)
    error = reply.content.config_records.get(member_key(index, MEMBER_ERROR))
    if error is not None:
        code = error.get("code", 0)
        return Message(Error(code=code if isinstance(code, int) else 0,
                             reason=str(error.get("reason", ""))), reply_to=sent)
    prefix = member_key(index, "")
    return Message(RecordDict({k[len(prefix):]: v for k, v in reply.content.items()
                               if k.startswith(prefix)}), reply_to=sent)
