"""Strategies for heterogeneous sites: FedNova, SCAFFOLD and FedDyn as Flower strategies.

Flower 1.41 has none of the three among its message-API strategies
(``flwr.serverapp.strategy``), so they are written here from the papers; the maths is
in :mod:`fedimg.serverapp.drift_rules`. Each is Flower's FedAvg (its messages, its
metric aggregation, its evaluation) with its own ``aggregate_train``:

* :class:`FedNova` (Wang et al. 2020) divides each client's update by its local steps
  (momentum-aware), read from the client's ``train/steps`` metric. Server only.
* :class:`Scaffold` (Karimireddy et al. 2020) corrects every local gradient by
  ``c - c_i``, the server's control minus the client's.
* :class:`FedDyn` (Acar et al. 2021) adds ``-<g_k, w> + alpha/2 ||w - x||^2`` to a
  client's loss, ``g_k`` being the client's gradient state.

Who owns the per-client state (SCAFFOLD's ``c_i``, FedDyn's ``g_k``): the server, in
this strategy, which the resume checkpoint saves whole (``checkpoints/last.pt``; see
:func:`fedimg.serverapp.checkpoint.strategy_state`). Both are functions of what the
client sent (option II of SCAFFOLD needs only ``x``, ``y_i``, the client's steps and
learning rate), so the server learns nothing new by keeping them, and a rejected,
late or discarded update changes neither ``c_i`` nor ``c``: ``c`` stays the mean of
the ``c_i``, however replies fail. The client is stateless: each message carries its
gradient offset (:data:`~fedimg.transport.records.GRAD_OFFSET_KEY`; ``c - c_i``, or
``-g_k``) for the trained parameters only, and a deployed site keeps nothing on disk.
The cost is one model-sized array more per training message, SCAFFOLD's own price
(the paper sends ``(x, c)``), and one copy of the trained parameters per client on
the server and in ``last.pt``.

Clients count equally in SCAFFOLD's and FedDyn's model average, as in both papers;
FedNova weighs them by examples. Buffers (BatchNorm statistics) and frozen arrays get
the example-weighted mean in all three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedimg.errors import UpdateError
from fedimg.serverapp.drift_rules import (
    Arrays,
    feddyn_client_gradient,
    feddyn_server,
    fednova,
    scaffold_client_control,
    scaffold_server,
    step_norm,
    zeros_like,
)
from fedimg.transport.records import GRAD_OFFSET_KEY, NUM_EXAMPLES_KEY, PROXIMAL_MU_KEY

STEPS_METRIC = "train/steps"  # training/loop.py:TrainResult.as_metrics
_MAX_STEPS = 10 ** 9


def local_steps(content: RecordDict) -> int:
    """The local steps a training reply reports (checked by :meth:`_DriftBase.check_reply`)."""
    return int(next(iter(content.metric_records.values()))[STEPS_METRIC])


class _DriftBase(FedAvg):
    """FedAvg's messages and metrics, with a rule of its own for the trained arrays.

    ``fixed_keys``: the arrays clients do not train (buffers, frozen parameters), which
    get the example-weighted mean. The round loop binds ``partition_of`` (node id ->
    client id) before the first round, so per-client state survives new node ids.
    """

    def __init__(self, *, fixed_keys: Iterable[str] = (), **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.fixed_keys = frozenset(fixed_keys)
        self.current_arrays: ArrayRecord | None = None  # x, the model of this round

    def bind_clients(self, partition_of: Callable[[int], int]) -> None:
        """Tell the strategy which client each node is (a callable: never checkpointed)."""
        self.partition_of = partition_of

    def client_of(self, node_id: int) -> int:
        """The client id of node ``node_id``."""
        bound = getattr(self, "partition_of", None)
        if bound is None:
            raise RuntimeError(f"{type(self).__name__} keeps per-client state: bind_clients() "
                               "must be called before the first round")
        return int(bound(node_id))

    def check_reply(self, metrics: dict[str, float]) -> None:
        """A reply filter's check: the reply reports a plausible count of local steps."""
        steps = metrics.get(STEPS_METRIC)
        if steps is None or not math.isfinite(steps) or steps != int(steps) \
                or not 1 <= steps <= _MAX_STEPS:
            raise UpdateError(f"strategy {type(self).__name__} needs the reply's "
                              f"'{STEPS_METRIC}' as a whole number of local steps >= 1; "
                              f"got {steps!r}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def trained(self) -> Arrays:
        """x restricted to the trained floating-point arrays."""
        assert self.current_arrays is not None
        arrays = {k: v.numpy() for k, v in self.current_arrays.items()}
        return {k: v for k, v in arrays.items()
                if k not in self.fixed_keys and v.dtype.kind == "f"}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid or self.current_arrays is None:
            return None, None
        contents = [m.content for m in valid]
        out = aggregate_arrayrecords(contents, self.weighted_by_key)  # buffers and frozen
        x = self.trained()
        ys = [{k: c[self.arrayrecord_key][k].numpy() for k in x} for c in contents]
        for key, value in self.rule(server_round, x, ys, valid).items():
            out[key] = Array(np.ascontiguousarray(value))
        return out, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def rule(self, server_round: int, x: Arrays, ys: list[Arrays],
             replies: list[Message]) -> Arrays:
        raise NotImplementedError


def with_offset(message: Message, offset: Arrays | None) -> Message:
    """``message`` with its own content, carrying ``offset`` (if any) for the client."""
    if offset is None:
        return message
    content = RecordDict(dict(message.content.items()))  # the others share one content
    content[GRAD_OFFSET_KEY] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in offset.items()})
    return Message(content=content, message_type=message.metadata.message_type,
                   dst_node_id=message.metadata.dst_node_id, group_id=message.metadata.group_id)


class FedNova(_DriftBase):
    """FedNova (Wang et al. 2020): each update normalised by its client's local steps."""

    def __init__(self, *, momentum: float = 0.0, server_lr: float = 1.0,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.momentum, self.server_lr = momentum, server_lr

    def rule(self, server_round: int, x: Arrays, ys: list[Arrays],
             replies: list[Message]) -> Arrays:
        weights = [float(next(iter(m.content.metric_records.values()))[NUM_EXAMPLES_KEY])
                   for m in replies]
        norms = [step_norm(local_steps(m.content), self.momentum) for m in replies]
        return fednova(x, ys, weights=weights, norms=norms, server_lr=self.server_lr)


class Scaffold(_DriftBase):
    """SCAFFOLD (Karimireddy et al. 2020): control variates ``c`` and ``c_i`` on the server.

    ``client_lr(server_round)`` is the learning rate every client used in that round
    (the config's schedule, not a number the client reports); ``momentum`` its SGD
    momentum, for option II's step count (:func:`~fedimg.serverapp.drift_rules.step_norm`).
    """

    def __init__(self, *, num_clients: int, client_lr: Callable[[int], float],
                 momentum: float = 0.0, server_lr: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_clients, self.client_lr = num_clients, client_lr
        self.momentum, self.server_lr = momentum, server_lr
        self.control: Arrays = {}  # c; empty = zeros
        self.client_controls: dict[int, Arrays] = {}  # c_i by client id; absent = zeros

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        return [with_offset(m, self.offset(self.client_of(m.metadata.dst_node_id)))
                for m in messages]

    def offset(self, client: int) -> Arrays | None:
        """``c - c_i`` for ``client``; None while both are zero (round 1)."""
        c_i = self.client_controls.get(client)
        if not self.control and c_i is None:
            return None
        c = self.control or zeros_like(c_i or {})
        c_i = c_i if c_i is not None else zeros_like(c)
        return {k: c[k] - c_i[k] for k in c}

    def rule(self, server_round: int, x: Arrays, ys: list[Arrays],
             replies: list[Message]) -> Arrays:
        lr, c = self.client_lr(server_round), self.control or zeros_like(x)
        deltas = []
        for y, reply in zip(ys, replies):
            client = self.client_of(reply.metadata.src_node_id)
            c_i = self.client_controls.get(client) or zeros_like(x)
            norm = step_norm(local_steps(reply.content), self.momentum)
            new = scaffold_client_control(c_i, c, x, y, norm=norm, lr=lr)
            deltas.append({k: new[k] - c_i[k] for k in x})
            self.client_controls[client] = new
        new_x, self.control = scaffold_server(x, ys, c, deltas, num_clients=self.num_clients,
                                              server_lr=self.server_lr)
        return new_x


class FedDyn(_DriftBase):
    """FedDyn (Acar et al. 2021): dynamic regularisation with ``alpha``.

    The client's loss gets ``-<g_k, w> + alpha/2 ||w - x||^2``: the quadratic term
    travels as ``proximal-mu = alpha`` (FedProx's), the linear one as the gradient
    offset ``-g_k``.
    """

    def __init__(self, *, alpha: float, num_clients: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.alpha, self.num_clients = alpha, num_clients
        self.h: Arrays = {}  # the server state h; empty = zeros
        self.client_gradients: dict[int, Arrays] = {}  # g_k by client id; absent = zeros

    def check_reply(self, metrics: dict[str, float]) -> None:
        """FedDyn reads no metric."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config[PROXIMAL_MU_KEY] = self.alpha
        messages = super().configure_train(server_round, arrays, config, grid)
        return [with_offset(m, self.offset(self.client_of(m.metadata.dst_node_id)))
                for m in messages]

    def offset(self, client: int) -> Arrays | None:
        """``-g_k`` for ``client``; None before its first round."""
        g_k = self.client_gradients.get(client)
        return None if g_k is None else {k: -v for k, v in g_k.items()}

    def rule(self, server_round: int, x: Arrays, ys: list[Arrays],
             replies: list[Message]) -> Arrays:
        for y, reply in zip(ys, replies):
            client = self.client_of(reply.metadata.src_node_id)
            g_k = self.client_gradients.get(client) or zeros_like(x)
            self.client_gradients[client] = feddyn_client_gradient(g_k, x, y, alpha=self.alpha)
        new_x, self.h = feddyn_server(x, ys, self.h or zeros_like(x), alpha=self.alpha,
                                      num_clients=self.num_clients)
        return new_x
