"""The Flower ClientApp: thin handlers over :class:`fedimg.clientapp.environment.TaskEnvironment`.

Each handler reads the run config from the message, gets this process's cached
task environment, loads the global weights, runs plain-PyTorch training or
evaluation, and replies with the update and metrics. Only weights and metrics
leave the client. Used unchanged by simulation (``python -m fedimg.simulate``),
``flwr run .`` and deployed SuperNodes.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedimg.simulation import fleet
from fedimg.simulation.attacks import poisoned_update
from fedimg.simulation.faults import inject_fault
from fedimg.transport.codecs import compress_update
from fedimg.config import ClassWeighting, FedimgConfig, HeadInit
from fedimg.errors import DataError, UpdateError
from fedimg.transport.records import (
    ARRAYS_KEY,
    ATTEMPT_KEY,
    CLASS_COUNTS_KEY,
    COMPRESSION_KEY,
    CONFIG_KEY,
    COUNT_KEY,
    DECLINED_KEY,
    HEAD_STATS_ACTION,
    LEDGER_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    PROXIMAL_MU_KEY,
    ROUND_KEY,
    SITE_KEY,
    client_of_node,
    cohort_partitions,
    cohort_reply,
    config_from_record,
    counts_from_record,
    counts_record,
    head_stats_content,
    metric_record,
    partitions_from_record,
    arrays_to_state_dict,
    reply_content,
    state_dict_to_record,
)
from fedimg.transport.elision import restore
from fedimg.clientapp.frozen_home import frozen_candidates, home_keys
from fedimg.transport.packing import PACKED_ARRAYS_KEY, pack_content, unpack_content
from fedimg.privacy import PRIVACY_MODES
from fedimg.resolve import check_registries
from fedimg.clientapp.ledger import ledger_keeper, open_site_ledger
from fedimg.clientapp.policy import check_policy
from fedimg.clientapp.site import SiteOptions, site_options
from fedimg.transport.grid import content_bytes
from fedimg.clientapp.environment import TaskEnvironment, environment, site_environment
from fedimg.clientapp.secure import secure_aggregation_mod
from fedimg.clientapp.drift import grad_offset
from fedimg.clientapp.conditions import device_conditions, pace
from fedimg.clientapp.cohort import statistics_cohort, train_cohort
from fedimg.clientapp.personal import PersonalRound, personal_metrics

# The error-feedback residual of update compression lives in the client's Flower
# context.state between rounds (a DP ledger lives with its keeper: fedimg.clientapp.ledger).
RESIDUAL_KEY = "fedimg-ef-residual"
# FedBN: this client's own BatchNorm weights and statistics, between rounds.
LOCAL_BN_KEY = "fedimg-local-bn"
# fl.personal: this client's own head (FedPer, FedRep) or personal model (Ditto).
PERSONAL_KEY = "fedimg-personal"

app = ClientApp(mods=[secure_aggregation_mod])


def _threads(cfg: FedimgConfig) -> int:
    return cfg.train.num_threads or max(1, int(cfg.sim.num_cpus_per_client))


def _partition_id(msg: Message, content: RecordDict, context: Context) -> int:
    """Which client a simulated node is: the server's address book, else its node config."""
    if PARTITION_KEY in content.array_records:
        pid = client_of_node(content[PARTITION_KEY], msg.metadata.dst_node_id)
        if pid is not None:
            return pid
    if "partition-id" not in context.node_config:
        raise DataError("this node has no 'partition-id' in its node config; pass "
                        "--node-config 'partition-id=0 num-partitions=N'")
    return int(context.node_config["partition-id"])


def _setup(msg: Message, context: Context) -> tuple[TaskEnvironment, int, RecordDict,
                                                    dict[str, torch.Tensor]]:
    """This process's task environment with the global weights loaded, and the client id.

    A deployed SuperNode names its own data (``data-path`` in its node config): its
    environment holds that site's images, as client 0. A simulated node is the
    partition the server's address book gives it, of the dataset every worker loads.
    """
    content = unpack_content(msg.content)
    config = content["config"]
    cfg = check_registries(config_from_record(config))  # a client never trusts a config
    site = site_options(context.node_config)
    if site is not None:  # then holds it to its own floor, before touching its data
        check_policy(cfg, site.policy, site=site.name)
    if site is None:
        env = environment(str(config[CONFIG_KEY]), _threads(cfg))
        pid = _partition_id(msg, content, context)
        if PARTITION_KEY in content.array_records:
            env.install_partitions(partitions_from_record(content[PARTITION_KEY]))
    else:
        env, pid = _site_environment(str(config[CONFIG_KEY]), site), 0
    if cfg.train.class_weighting == ClassWeighting.federated \
            and CLASS_COUNTS_KEY in content.array_records:
        try:
            env.install_class_counts(counts_from_record(content, num_classes=env.num_classes))
        except ValueError as exc:
            raise UpdateError(f"rejected the server's class counts: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    arrays = restore(content, lambda keys: frozen_candidates(env, keys, site=site is not None),
                     allowed=env.frozen_keys)  # frozen arrays may stay home (elision)
    if arrays is not None:
        state = arrays_to_state_dict(arrays, env.reference)
        env.load_state(state)
    return env, pid, config, state


def _site_environment(config_json: str, site: SiteOptions) -> TaskEnvironment:
    """A deployed site's environment; a data error is told to the server without names.

    File names are often patient ids: the full error (every file and why) goes to the
    site's own log, the server hears how many problems there were and where to look.
    """
    try:
        return site_environment(config_json, site)
    except DataError as exc:
        logging.getLogger(__name__).error("site %s: %s", site.name, exc)
        raise DataError(f"site {site.name}: its data does not fit this run "
                        f"({type(exc).__name__}); the site's own log names the files and "
                        "the fix (fedimg-client --check)") from None


def _use_local_bn(env: TaskEnvironment, context: Context) -> None:
    """FedBN (``fl.local_bn``): put this client's own BatchNorm back over the global one.

    Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch
    Normalization": every other weight comes from the server; BatchNorm layers keep
    what this client learnt (from the first global model on, until it has trained).
    """
    kept = context.state.array_records.get(LOCAL_BN_KEY)
    if env.cfg.fl.local_bn and kept is not None:
        env.model.load_state_dict({k: torch.from_numpy(np.array(v.numpy()))
                                   for k, v in kept.items()}, strict=False)


def _keep_local_bn(env: TaskEnvironment, context: Context) -> None:
    if env.cfg.fl.local_bn:  # the BatchNorm entries only, not a copy of the whole model
        state = env.model.state_dict()
        context.state[LOCAL_BN_KEY] = ArrayRecord(
            {k: Array(state[k].detach().cpu().numpy().copy(order="C"))
             for k in env.batchnorm_keys})


def _kept_personal(context: Context) -> dict[str, torch.Tensor] | None:
    kept = context.state.array_records.get(PERSONAL_KEY)
    return None if kept is None else {k: torch.from_numpy(np.array(v.numpy()))
                                      for k, v in kept.items()}


def _keep_personal(context: Context, kept: dict[str, torch.Tensor] | None) -> None:
    if kept is not None:  # in this node's state only: never in a reply
        context.state[PERSONAL_KEY] = ArrayRecord(
            {k: Array(v.numpy().copy(order="C")) for k, v in kept.items()})


def _reply(msg: Message, content: RecordDict) -> Message:
    """The reply to ``msg``, its arrays packed the way the server packed its own."""
    if PACKED_ARRAYS_KEY in msg.content.array_records:
        content = pack_content(content, ARRAYS_KEY)
    return Message(content, reply_to=msg)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Report this client's partition id and split sizes (and build its environment).

    A deployed site also reports its name and class counts; the server numbers the
    sites by name, since their own ids are all 0.
    """
    env, pid, _, _ = _setup(msg, context)
    data = env.client(pid)
    info = MetricRecord({"partition-id": pid, "num-train": data.num_train,
                         "num-val": data.num_val, "num-classes": env.num_classes})
    content = RecordDict({"metrics": info})
    site = site_options(context.node_config)
    if site is not None:
        if site.state_dir:
            open_site_ledger(site)  # a missing or corrupt ledger stops the run before round 1
        content[SITE_KEY] = ConfigRecord({"name": site.name})  # no paths leave the site
        if env.cfg.train.class_weighting == ClassWeighting.federated:  # refused under DP
            content[CLASS_COUNTS_KEY] = counts_record(env.own_class_counts())
    return Message(content, reply_to=msg)


class _ContextStash:
    """A simulated client's DP ledger in its node's ``context.state`` between rounds."""

    def __init__(self, context: Context) -> None:
        self.state = context.state

    def get(self) -> str | None:
        record = self.state.config_records.get(LEDGER_KEY)
        return None if record is None else str(record["json"])

    def put(self, ledger_json: str) -> None:
        self.state[LEDGER_KEY] = ConfigRecord({"json": ledger_json})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on the local partition (privately if configured).

    Under DP-SGD a client whose budget cannot cover the round replies with its
    privacy metrics and the reason instead of an update. A cohort message (several
    small clients, ``sim.cohort_size``) is answered for each of its members
    (:mod:`fedimg.clientapp.cohort`).
    """
    env, pid, config, start = _setup(msg, context)
    members = cohort_partitions(msg.content)
    if members is not None:  # several small clients in one message (sim.cohort_size)
        return Message(cohort_reply(train_cohort(
            env, members, config=config, start=start, message=msg.content,
            site=site_options(context.node_config))), reply_to=msg)
    _use_local_bn(env, context)
    server_round = int(config[ROUND_KEY])
    inject_fault(env.cfg, server_round, pid)
    try:
        device = device_conditions(env, pid, server_round, int(config.get(ATTEMPT_KEY, 1)))
    except fleet.DeviceAbsent as exc:  # an error reply: no update, no traceback in the logs
        return msg.create_error_reply(Error(code=fleet.ABSENT_CODE, reason=str(exc)))
    mode = PRIVACY_MODES.get(env.cfg.privacy.mode)
    offered = msg.content.config_records.get(LEDGER_KEY)
    keeper = ledger_keeper(stash=_ContextStash(context), env=env, partition_id=pid,
                           offered=None if offered is None else json.loads(str(offered["json"])),
                           site=site_options(context.node_config))
    started = time.perf_counter()
    with PersonalRound(env, pid, kept=_kept_personal(context), start=start,
                       server_round=server_round) as personal:
        result = mode.train(env, pid, server_round=server_round,
                            proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
                            grad_offset=grad_offset(msg.content.array_records,
                                                    trained=env.trained_keys(),
                                                    reference=env.reference),
                            ledger=keeper.load(), admit=keeper.admit)
    _keep_personal(context, personal.kept)
    compute_s = time.perf_counter() - started
    if result.ledger is not None:  # on the site's disk before anything leaves
        keeper.save(result.ledger)
        result.metrics.update(keeper.report(result.ledger))
    metrics = metric_record(result.metrics, num_examples=result.num_examples)
    _keep_local_bn(env, context)
    if result.declined:
        content = reply_content(metrics=metrics)
        content[DECLINED_KEY] = ConfigRecord({"reason": result.declined})
    else:
        sent = poisoned_update(env.cfg, pid, start, env.state(), env.trained_keys())
        content = _update_content(env, context, metrics, start, sent)
    if result.ledger is not None:  # a report: accountant history, sigma, q, noisy counts
        content[LEDGER_KEY] = ConfigRecord({"json": json.dumps(result.ledger)})
    if device is not None:
        pace(env, device, metrics=content[METRICS_KEY], bytes_down=content_bytes(msg.content),
             bytes_up=content_bytes(content), compute_s=compute_s,
             steps=int(result.metrics.get("train/steps", 0)))
    return _reply(msg, content)


def _update_content(env: TaskEnvironment, context: Context, metrics: MetricRecord,
                    start: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]
                    ) -> RecordDict:
    """The reply carrying ``sent``: the weights, or their compressed delta.

    Error feedback keeps what compression dropped in ``context.state`` (on the
    client), to be added to the next round's delta.
    """
    comp = env.cfg.compression
    if comp.kind == "none":  # frozen arrays stay home: the server has them (transport.elision)
        return reply_content(metrics=metrics,
                             arrays=state_dict_to_record(sent, omit=home_keys(env)))
    residual = None
    if comp.error_feedback:
        kept = context.state.array_records.get(RESIDUAL_KEY)
        residual = {k: torch.from_numpy(v.numpy()) for k, v in kept.items()} if kept else {}
    arrays, memory = compress_update(
        comp.kind, comp.topk_fraction, global_state=start, local_state=sent,
        trained=env.trained_keys(), frozen=env.frozen_keys, residual=residual)
    if comp.error_feedback:
        context.state[RESIDUAL_KEY] = ArrayRecord(
            {k: Array(np.asarray(v.numpy(), order="C")) for k, v in memory.items()})
    content = reply_content(metrics=metrics, arrays=ArrayRecord(
        {k: Array(np.asarray(v, order="C")) for k, v in arrays.items()}))
    content[COMPRESSION_KEY] = ConfigRecord({"codec": comp.kind})
    return content


@app.query(HEAD_STATS_ACTION)
def head_statistics(msg: Message, context: Context) -> Message:
    """Fed3R's feature sums of the local training images (``fl.head_init=ridge``).

    Only a run whose validated config asks for them gets them: that config has no
    privacy mode and no secure aggregation (``fedimg.config.checks``), so a site whose
    policy requires privacy has refused it already in ``_setup``.
    """
    env, pid, _, _ = _setup(msg, context)
    if env.cfg.fl.head_init != HeadInit.ridge:
        raise DataError(f"head statistics asked for, but fl.head_init={env.cfg.fl.head_init}: "
                        "this client sends them only to a run configured for them")
    members = cohort_partitions(msg.content)
    if members is not None:  # several small simulated clients in one message
        return Message(cohort_reply(statistics_cohort(
            env, members, message=msg.content, site=site_options(context.node_config))),
            reply_to=msg)
    stats = env.head_statistics(pid)
    return Message(head_stats_content(stats.gram, stats.moment, stats.count), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local validation split.

    With ``fl.personalize_steps=k`` the client then trains that model for k local
    steps and evaluates again (``val/personal_*``): how well the global model serves as
    a starting point for each client (the evaluation of personalized FL, e.g. Yu et
    al. 2020, "Salvaging Federated Learning by Local Adaptation"). With ``fl.personal``
    the ``val/personal_*`` metrics are instead those of the model this client keeps: the
    global body with its own head, or Ditto's personal model (:mod:`.personal`). Nothing
    is sent back but metrics, and the next message reloads the global weights.
    """
    env, pid, config, _ = _setup(msg, context)
    _use_local_bn(env, context)
    metrics, num_examples = env.evaluate_client(pid)
    steps = env.cfg.fl.personalize_steps
    if steps:  # the global model fine-tuned on this client's own data for k steps, at
        # the base learning rate: a cosine schedule is near 0 by the last round
        env.train(pid, server_round=int(config[ROUND_KEY]), steps=steps, lr=env.cfg.train.lr)
        tuned, _ = env.evaluate_client(pid)
        metrics.update({f"val/personal_{k.split('/', 1)[1]}": v for k, v in tuned.items()
                        if COUNT_KEY not in k})
    if env.cfg.fl.personal != "none":  # its own head over the global body, or Ditto's v
        metrics.update(personal_metrics(env, pid, kept=_kept_personal(context)))
    return _reply(msg, reply_content(metrics=metric_record(metrics, num_examples=num_examples)))
