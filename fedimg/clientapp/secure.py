"""The client filter of secure aggregation: a Flower mod around the training handler.

With ``fl.secure_aggregation=secaggplus`` a training round reaches the client as four
messages (:mod:`fedimg.privacy.secagg_keys`). This mod answers the key stages itself;
at the ``collect`` stage it lets the training handler run, then replaces the update in
its reply by the masked integer contribution (:mod:`fedimg.privacy.secagg`): the
example-weighted update, or under ``privacy=distributed_dp`` the clipped update with
this client's share of the noise (:mod:`fedimg.privacy.distributed_dp`). Metrics
(and a DP-SGD ledger report) still travel in the clear; the weights never do.

The client trusts no number of the server's: the plan it is sent must equal the one it
computes from the run config it checked itself, and every stage checks what it is
asked (see :mod:`fedimg.privacy.secagg_keys`). A refused or malformed request gets an
error reply, and the client's secrets stay in its ``context.state``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from fedimg.config import FedimgConfig
from fedimg.errors import FedimgError
from fedimg.privacy import secagg_keys as keys_
from fedimg.privacy.client_dp import sampled_clients
from fedimg.privacy.distributed_dp import noisy_body, round_plan
from fedimg.privacy.secagg import (
    SecAggError,
    SecAggPlan,
    byte_strings,
    coordinate_scale,
    encode,
    flatten,
    masked,
    quantize,
)
from fedimg.privacy.secure_noise import ChaChaStream
from fedimg.resolve import check_registries
from fedimg.transport.packing import unpack_content
from fedimg.transport.records import (
    ARRAYS_KEY,
    DECLINED_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SECAGG_KEY,
    SECAGG_VECTOR_KEY,
    config_from_record,
)

log = logging.getLogger(__name__)

STATE_KEY = "fedimg-secagg-state"  # this client's keys between stages (context.state)
REFUSED_CODE = 460  # an error reply: this client refused a secure-aggregation request


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable
                           ) -> Message:
    """Run a SecAgg+ stage (or pass any other message to the handler)."""
    if msg.metadata.message_type != MessageType.TRAIN or \
            SECAGG_KEY not in msg.content.config_records:
        return call_next(msg, context)
    request = msg.content.config_records[SECAGG_KEY]
    try:
        stage = str(request["stage"])
        if stage == "collect":
            return _collect(msg, context, call_next)
        answer = _STAGES[stage](msg, context, request) if stage in _STAGES else None
        if answer is None:
            raise SecAggError(f"secure aggregation: unknown stage {stage!r}")
    except (SecAggError, FedimgError, KeyError, TypeError, ValueError) as exc:
        log.warning("secure aggregation request refused: %s", exc)
        return msg.create_error_reply(Error(code=REFUSED_CODE, reason=str(exc)[:500]))
    return Message(RecordDict({SECAGG_KEY: ConfigRecord(answer)}), reply_to=msg)


def _load(context: Context, stage: str, server_round: int) -> keys_.ClientKeys:
    record = context.state.config_records.get(STATE_KEY)
    if record is None:
        raise SecAggError(f"secure aggregation: stage {stage} before setup; refused")
    keys = keys_.ClientKeys.from_json(str(record["json"]))
    keys.expect(stage, server_round)
    return keys


def _save(context: Context, keys: keys_.ClientKeys) -> None:
    context.state[STATE_KEY] = ConfigRecord({"json": keys.to_json()})


def _checked_plan(cfg: FedimgConfig, offered: SecAggPlan) -> SecAggPlan:
    """The server's plan, if it is the one this client computes from its own checks."""
    most = sampled_clients(cfg)
    if offered.sampled > most or offered.sampled < 2:
        raise SecAggError(f"secure aggregation: a plan for {offered.sampled} clients, this "
                          f"run samples at most {most}; refused")
    own = round_plan(cfg, sampled=offered.sampled, dim=offered.dim,
                     max_weight=offered.max_weight)
    if own != offered:
        raise SecAggError(f"secure aggregation: the server's plan {offered} differs from "
                          f"this client's {own}; refused")
    return own


def _setup(msg: Message, context: Context, request: ConfigRecord) -> dict[str, Any]:
    cfg = check_registries(config_from_record(msg.content.config_records["config"]))
    if cfg.fl.secure_aggregation != "secaggplus":
        raise SecAggError("secure aggregation requested by a run configured without it")
    plan = _checked_plan(cfg, SecAggPlan.from_record(_json(request["plan-json"])))
    keys, public = keys_.setup(msg.metadata.dst_node_id, int(request["round"]), plan)
    keys.arrays = [str(k) for k in request["keys"]]
    _save(context, keys)
    return {"public-keys": public}


def _json(value: Any) -> dict[str, Any]:
    out = json.loads(str(value))
    if not isinstance(out, dict):
        raise SecAggError("secure aggregation: the plan is not a JSON object")
    return out


def _share(msg: Message, context: Context, request: ConfigRecord) -> dict[str, Any]:
    keys = _load(context, "share_keys", int(request["round"]))
    nodes, publics = list(request["nodes"]), byte_strings(request["public-keys"], "public keys")
    if len(publics) != 2 * len(nodes):
        raise SecAggError("secure aggregation: public keys do not match the node list")
    published = {int(n): [publics[2 * i], publics[2 * i + 1]]
                 for i, n in enumerate(nodes)}
    recipients, ciphertexts = keys_.share_keys(keys, published)
    _save(context, keys)
    log.info("secure aggregation: round %d, key shares sent to %d neighbours", keys.round,
             len(recipients))
    return {"recipients": recipients, "ciphertexts": ciphertexts}


def _unmask(msg: Message, context: Context, request: ConfigRecord) -> dict[str, Any]:
    keys = _load(context, "unmask", int(request["round"]))
    nodes, shares = keys_.reveal(keys, [int(n) for n in request["survived"]],
                                 [int(n) for n in request["dropped"]])
    _save(context, keys)
    return {"nodes": nodes, "shares": shares}


_STAGES = {"setup": _setup, "share_keys": _share, "unmask": _unmask}


def _collect(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt the shares, train (the handler), and mask the update in the reply."""
    request = msg.content.config_records[SECAGG_KEY]
    keys = _load(context, "collect", int(request["round"]))
    keys_.receive_shares(keys, [int(n) for n in request["senders"]],
                         byte_strings(request["ciphertexts"], "ciphertexts"))
    _save(context, keys)
    reply = call_next(msg, context)
    if reply.has_error() or DECLINED_KEY in reply.content.config_records:
        return reply  # no update: the server rebuilds this client's pairwise masks
    plan = SecAggPlan.from_record(keys.plan)
    content = unpack_content(reply.content)
    global_arrays = {k: v.numpy() for k, v in unpack_content(msg.content)[ARRAYS_KEY].items()}
    local = {k: v.numpy() for k, v in content[ARRAYS_KEY].items()}
    order = _summed_keys(keys.arrays, global_arrays, local, plan)
    update = flatten(local, order) - flatten(global_arrays, order)
    weight = int(content[METRICS_KEY][NUM_EXAMPLES_KEY])
    dp = plan.noise_std > 0
    if not dp:  # BatchNorm statistics in their own unit (under DP they are frozen)
        update = update / coordinate_scale(local, order)
    vector = _contribution(update, weight=weight, plan=plan, dp=dp)
    vector = masked(vector, own_seed=keys_.own_seed(keys), pair_seeds=keys_.pair_seeds(keys),
                    me=keys.me, plan=plan)
    del content[ARRAYS_KEY]
    wide = plan.modulus_bits > 32
    content[SECAGG_VECTOR_KEY] = ArrayRecord(
        {"masked": Array(vector.astype(np.uint64 if wide else np.uint32))})
    return Message(content, reply_to=msg)


def _summed_keys(names: list[str], start: dict[str, np.ndarray], local: dict[str, np.ndarray],
                 plan: SecAggPlan) -> list[str]:
    """The arrays the server sums, checked: they exist and fill the plan's vector.

    Leaving an array out hides nothing less (its change is simply not sent); one that
    changed anyway is logged, since the server will keep its old value.
    """
    if len(set(names)) != len(names) or not set(names) <= set(start) or \
            sum(int(start[k].size) for k in names) != plan.dim:
        raise SecAggError("secure aggregation: the summed arrays do not match the model")
    left_out = [k for k in start if k not in names and k in local  # frozen ones stay home
                and not np.array_equal(start[k], local[k])]
    if left_out:
        log.warning("secure aggregation: %d changed arrays are not summed (e.g. %s)",
                    len(left_out), left_out[0])
    return names


def _contribution(update: np.ndarray, *, weight: int, plan: SecAggPlan, dp: bool) -> np.ndarray:
    """The encoded (unmasked) contribution: weighted and clipped, or clipped and noised."""
    stream = ChaChaStream()
    if dp:
        return encode(noisy_body(update, plan, stream), weight=1, clipped=0, plan=plan)
    if not 0 < weight <= plan.max_weight:
        raise SecAggError(f"secure aggregation: {weight} examples, the plan allows "
                          f"1..{plan.max_weight}")
    body, clipped = quantize(update * (weight / plan.max_weight), plan, stream)
    if clipped:
        log.warning("secure aggregation: %d coordinates of the weighted update exceeded "
                    "secagg.clip_range=%g and were clipped", clipped, plan.clip)
    return encode(body, weight=weight, clipped=clipped, plan=plan)
