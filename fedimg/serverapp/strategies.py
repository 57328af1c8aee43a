"""Registry of Flower strategies, keyed by the ``strategy`` config value.

Every entry builds one of Flower's own message-API strategies
(``flwr.serverapp.strategy``); fedimg adds no aggregation maths of its own, only
the mapping from :class:`~fedimg.config.FederationConfig` to constructor
arguments and a NaN-aware metric aggregator.

* ``fedavg``: FedAvg, McMahan et al. 2017, "Communication-Efficient Learning of
  Deep Networks from Decentralized Data".
* ``fedprox``: FedProx, Li et al. 2020; the client adds (mu/2)||w - w_global||^2,
  reading ``proximal-mu`` from the message config.
* ``fedavgm``: FedAvg with server momentum, Hsu et al. 2019.
* ``fedadam`` / ``fedyogi``: adaptive server optimisers, Reddi et al. 2021.
* ``fedmedian``: coordinate-wise median, Yin et al. 2018.
* ``fedtrimmedavg``: coordinate-wise trimmed mean, Yin et al. 2018.
* ``krum``: Blanchard et al. 2017.
* ``multikrum``: Krum's m best-scored updates averaged (Blanchard et al. 2017);
  m = ``fl.krum_select``, by default the sampled clients minus ``fl.num_malicious``.

For heterogeneous sites (Flower 1.41 has none of these; fedimg's own, from the papers,
in :mod:`fedimg.serverapp.drift_strategies`):

* ``fednova``: FedNova, Wang et al. 2020; updates normalised by each client's local
  steps (momentum-aware), so clients with more data do not pull harder.
* ``scaffold``: SCAFFOLD, Karimireddy et al. 2020; control variates correct each local
  gradient for client drift (the server keeps every client's, checkpointed).
* ``feddyn``: FedDyn, Acar et al. 2021; a dynamic regulariser (``fl.feddyn_alpha``)
  whose stationary points are those of the global objective.

FedBN (Li et al. 2021) is not a server rule: with ``fl.local_bn=true`` any of these
runs with every client keeping its own BatchNorm layers (client side, see
:mod:`fedimg.clientapp.app`); the server still averages them, so its
central evaluation uses the averaged BatchNorm, while federated evaluation uses
each client's own.

Server optimisers (FedAvgM, FedAdam, FedYogi) treat every array as a parameter.
BatchNorm running statistics are not: an Adam step moves ``running_var`` by about
``eta`` whatever its scale and can make it negative (NaN outputs). Those three are
therefore built with :class:`PlainBufferAveraging`, which gives buffers the plain
example-weighted mean and leaves the optimiser's step to the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedimg.config import FedimgConfig
from fedimg.errors import ConfigError
from fedimg.serverapp.drift_strategies import FedDyn, FedNova, Scaffold
from fedimg.training import scheduled_lr
from fedimg.transport.records import aggregate_metrics
from fedimg.registry import Registry

StrategyBuilder = Callable[[FedimgConfig, frozenset[str]], Strategy]


@dataclass(frozen=True)
class StrategySpec:
    """A strategy and its facts, so that no code branches on its name.

    ``min_replies``: usable updates a round needs for the rule to hold at all (robust
    aggregators); ``server_lr``: the server learning rate when ``fl.server_lr`` is
    unset (server optimisers); ``reads_server_lr``: the rule takes a server step of
    that size, so a recipe search tunes it (``compare.server_lr``); ``averages``: the
    output is the weighted average of the updates (what client-level DP's noise is
    calibrated for); ``loss_term``: the
    client adds a term to its loss (FedProx's proximal term, which DP-SGD's noisy
    per-sample gradient would drop). ``secure_sum``: the aggregate depends on the
    updates only through their weighted mean, so secure aggregation can compute it.
    ``baseline``: not a federation but a reference run
    on the same data and budget (``pooled``, ``local``; run by :mod:`fedimg.baselines`).
    ``sgd_steps``: the rule reads how far each client's SGD steps went (FedNova,
    SCAFFOLD); ``client_deltas``: it keeps per-client state from each ``y_i - x``.
    ``own_messages``: each client's message carries arrays of its own (SCAFFOLD's and
    FedDyn's corrections), so clients cannot share one (``sim.cohort_size``).
    """

    build: StrategyBuilder
    min_replies: Callable[[FedimgConfig], int] = lambda cfg: 1
    server_lr: float = 1.0
    reads_server_lr: bool = False  # fl.server_lr matters (FedAvgM, FedAdam, FedYogi, ...)
    averages: bool = False
    loss_term: bool = False
    secure_sum: bool = False  # needs only the weighted mean of the updates (works under SecAgg)
    baseline: bool = False
    sgd_steps: bool = False  # reads the clients' SGD steps (train.optimizer=sgd only)
    client_deltas: bool = False  # reads each y_i - x (not with FedBN's local BatchNorm)
    own_messages: bool = False  # a message per client, with its own arrays (no cohorts)


STRATEGIES: Registry[StrategySpec] = Registry("strategy", config_key="strategy")


def register(name: str, **facts: Any) -> Callable[[StrategyBuilder], StrategyBuilder]:
    """Decorator: register a builder under ``name`` with its :class:`StrategySpec` facts."""
    def decorator(builder: StrategyBuilder) -> StrategyBuilder:
        STRATEGIES.add(name, StrategySpec(build=builder, **facts))
        return builder
    return decorator


class PlainBufferAveraging:
    """Mixin for server-optimiser strategies: buffers get the plain weighted mean."""

    buffer_keys: frozenset[str] = frozenset()
    weighted_by_key: str

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        contents = [m.content for m in replies if not m.has_error()]
        if arrays is None or not contents or not self.buffer_keys:
            return arrays, metrics
        plain = aggregate_arrayrecords(contents, self.weighted_by_key)
        for key in self.buffer_keys & set(arrays.keys()):
            arrays[key] = plain[key]  # in place: FedAvgM keeps this record as its state
        return arrays, metrics


def _with_plain_buffers(cls: type[Strategy], buffer_keys: frozenset[str],
                        **kwargs: Any) -> Strategy:
    strategy_cls = type(cls.__name__, (PlainBufferAveraging, cls), {})
    strategy = strategy_cls(**kwargs)
    strategy.buffer_keys = buffer_keys
    return strategy


def common_kwargs(cfg: FedimgConfig) -> dict[str, Any]:
    """Arguments shared by every Flower strategy.

    Sampling is the round loop's (:class:`fedimg.serverapp.state.Sampler`, with
    ``fl.fraction_*`` and ``fl.min_*_clients``): it shows the strategy exactly the
    nodes it sampled, and the strategy configures a message for each of them.
    """
    return {
        "fraction_train": 1.0, "fraction_evaluate": 1.0,
        "min_train_nodes": 1, "min_evaluate_nodes": 0, "min_available_nodes": 1,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }


def sampled_clients(cfg: FedimgConfig) -> int:
    """Clients Flower samples for training each round."""
    return max(int(cfg.clients * cfg.fl.fraction_train), cfg.fl.min_train_clients)


def server_lr(cfg: FedimgConfig) -> float:
    """``fl.server_lr``, or the default of the configured strategy."""
    if cfg.fl.server_lr is not None:
        return cfg.fl.server_lr
    return STRATEGIES.get(cfg.strategy).server_lr


# Replies a robust aggregator needs to be robust at all: Krum n > 2f + 2 (Blanchard et
# al. 2017); a trimmed mean cuts int(beta n) values per end, none below n = 1/beta; a
# median of two is their mean.
def _krum_min(cfg: FedimgConfig) -> int:
    return 2 * cfg.fl.num_malicious + 3


def _trimmed_min(cfg: FedimgConfig) -> int:
    return math.ceil(1 / cfg.fl.trim_beta) if cfg.fl.trim_beta else 1


@register("fedavg", averages=True, secure_sum=True)
def fedavg(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedAvg: example-weighted mean of the client models."""
    return FedAvg(**common_kwargs(cfg))


@register("pooled", baseline=True)
def pooled(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """Pooled training: one client holding every site's data (the upper reference)."""
    return FedAvg(**common_kwargs(cfg))  # FedAvg of one client is that client's model


@register("local", baseline=True)
def local(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """Local-only training: each site alone, never exchanging weights (the lower one)."""
    return FedAvg(**common_kwargs(cfg))  # never asked to aggregate: sites train alone


@register("fedprox", averages=True, loss_term=True, secure_sum=True)
def fedprox(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedProx: FedAvg plus the proximal term the client adds to its loss."""
    return FedProx(**common_kwargs(cfg), proximal_mu=cfg.fl.proximal_mu)


@register("fedavgm", server_lr=1.0, reads_server_lr=True, secure_sum=True)
def fedavgm(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedAvgM: FedAvg with server momentum."""
    return _with_plain_buffers(FedAvgM, buffer_keys, **common_kwargs(cfg),
                               server_learning_rate=server_lr(cfg),
                               server_momentum=cfg.fl.server_momentum)


def _fedopt_kwargs(cfg: FedimgConfig) -> dict[str, Any]:
    fl = cfg.fl
    return {"eta": server_lr(cfg), "eta_l": cfg.train.lr, "beta_1": fl.beta_1,
            "beta_2": fl.beta_2, "tau": fl.tau}


@register("fedadam", server_lr=0.01, reads_server_lr=True, secure_sum=True)
def fedadam(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedAdam: Adam on the server over the averaged update."""
    return _with_plain_buffers(FedAdam, buffer_keys, **common_kwargs(cfg),
                               **_fedopt_kwargs(cfg))


@register("fedyogi", server_lr=0.01, reads_server_lr=True, secure_sum=True)
def fedyogi(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedYogi: Yogi on the server over the averaged update."""
    return _with_plain_buffers(FedYogi, buffer_keys, **common_kwargs(cfg),
                               **_fedopt_kwargs(cfg))


@register("fedmedian", min_replies=lambda cfg: 3)
def fedmedian(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedMedian: coordinate-wise median of the client models."""
    return FedMedian(**common_kwargs(cfg))


@register("fedtrimmedavg", min_replies=_trimmed_min)
def fedtrimmedavg(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedTrimmedAvg: coordinate-wise mean without the fl.trim_beta tails."""
    return FedTrimmedAvg(**common_kwargs(cfg), beta=cfg.fl.trim_beta)


@register("krum", min_replies=_krum_min)
def krum(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """Krum: the client model closest to its neighbours."""
    return Krum(**common_kwargs(cfg), num_malicious_nodes=cfg.fl.num_malicious)


@register("multikrum", min_replies=_krum_min)
def multikrum(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """MultiKrum: the mean of the m client models Krum scores best."""
    sampled = sampled_clients(cfg)
    select = cfg.fl.krum_select or sampled - cfg.fl.num_malicious
    if not 1 <= select <= sampled:
        raise ConfigError(f"fl.krum_select={select} must be between 1 and the {sampled} "
                          "clients sampled per round")
    return MultiKrum(**common_kwargs(cfg), num_malicious_nodes=cfg.fl.num_malicious,
                     num_nodes_to_select=select)


@register("fednova", sgd_steps=True, client_deltas=True, reads_server_lr=True)
def fednova(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedNova: each update divided by its client's (momentum-weighted) local steps."""
    return FedNova(**common_kwargs(cfg), fixed_keys=buffer_keys,
                   momentum=cfg.train.momentum, server_lr=server_lr(cfg))


@register("scaffold", loss_term=True, sgd_steps=True, client_deltas=True, own_messages=True,
          reads_server_lr=True)
def scaffold(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """SCAFFOLD: local gradients corrected by the control variates c - c_i."""
    return Scaffold(**common_kwargs(cfg), fixed_keys=buffer_keys, num_clients=cfg.clients,
                    client_lr=lambda r: scheduled_lr(cfg.train, server_round=r,
                                                     total_rounds=cfg.rounds),
                    momentum=cfg.train.momentum, server_lr=server_lr(cfg))


@register("feddyn", loss_term=True, client_deltas=True, own_messages=True)
def feddyn(cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Strategy:
    """FedDyn: FedAvg of the clients' dynamically regularised models, shifted by h/alpha."""
    return FedDyn(**common_kwargs(cfg), fixed_keys=buffer_keys, alpha=cfg.fl.feddyn_alpha,
                  num_clients=cfg.clients)


def min_replies(cfg: FedimgConfig) -> int:
    """Usable updates a round of ``cfg.strategy`` needs (1 unless it is a robust one)."""
    return STRATEGIES.get(cfg.strategy).min_replies(cfg)


def build_strategy(cfg: FedimgConfig, *, buffer_keys: Iterable[str] = ()) -> Strategy:
    """The Flower strategy named by ``cfg.strategy``.

    ``buffer_keys`` names the model's non-parameter arrays (BatchNorm statistics),
    which server optimisers must average rather than step. A client-level privacy
    mode wraps the strategy in Flower's DP wrapper (see :mod:`fedimg.privacy`).
    """
    from fedimg.privacy import PRIVACY_MODES

    buffers = frozenset(buffer_keys)
    spec = STRATEGIES.get(cfg.strategy)
    sampled, needed = sampled_clients(cfg), min_replies(cfg)
    if sampled < needed:
        raise ConfigError(f"strategy={cfg.strategy} needs at least {needed} updates per round "
                          f"to be robust (Krum: n > 2f + 2; trimmed mean: n >= 1/beta; "
                          f"median: n >= 3), but {sampled} clients are sampled; raise clients "
                          "or fl.fraction_train, or lower fl.num_malicious / fl.trim_beta")
    strategy = spec.build(cfg, buffers)
    wrap = PRIVACY_MODES.get(cfg.privacy.mode).wrap_strategy
    return wrap(strategy, cfg, buffers) if wrap is not None else strategy
