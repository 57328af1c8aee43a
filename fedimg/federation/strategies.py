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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedimg.config import FedimgConfig
from fedimg.federation.records import aggregate_metrics
from fedimg.registry import Registry

StrategyBuilder = Callable[[FedimgConfig], Strategy]
STRATEGIES: Registry[StrategyBuilder] = Registry("strategy", config_key="strategy")

# Server learning rates that suit each family when fl.server_lr is left unset.
_SERVER_LR_DEFAULTS = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


def common_kwargs(cfg: FedimgConfig) -> dict[str, Any]:
    """Sampling and aggregation arguments shared by every Flower strategy."""
    fl = cfg.fl
    return {
        "fraction_train": fl.fraction_train,
        "fraction_evaluate": fl.fraction_evaluate,
        "min_train_nodes": fl.min_train_clients,
        "min_evaluate_nodes": min(fl.min_evaluate_clients, cfg.clients),
        "min_available_nodes": fl.min_train_clients,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }


def server_lr(cfg: FedimgConfig) -> float:
    """``fl.server_lr``, or the default of the configured strategy."""
    if cfg.fl.server_lr is not None:
        return cfg.fl.server_lr
    return _SERVER_LR_DEFAULTS.get(cfg.strategy, 1.0)


@STRATEGIES.register()
def fedavg(cfg: FedimgConfig) -> Strategy:
    return FedAvg(**common_kwargs(cfg))


@STRATEGIES.register()
def fedprox(cfg: FedimgConfig) -> Strategy:
    return FedProx(**common_kwargs(cfg), proximal_mu=cfg.fl.proximal_mu)


@STRATEGIES.register()
def fedavgm(cfg: FedimgConfig) -> Strategy:
    return FedAvgM(**common_kwargs(cfg), server_learning_rate=server_lr(cfg),
                   server_momentum=cfg.fl.server_momentum)


def _fedopt_kwargs(cfg: FedimgConfig) -> dict[str, Any]:
    fl = cfg.fl
    return {"eta": server_lr(cfg), "eta_l": cfg.train.lr, "beta_1": fl.beta_1,
            "beta_2": fl.beta_2, "tau": fl.tau}


@STRATEGIES.register()
def fedadam(cfg: FedimgConfig) -> Strategy:
    return FedAdam(**common_kwargs(cfg), **_fedopt_kwargs(cfg))


@STRATEGIES.register()
def fedyogi(cfg: FedimgConfig) -> Strategy:
    return FedYogi(**common_kwargs(cfg), **_fedopt_kwargs(cfg))


@STRATEGIES.register()
def fedmedian(cfg: FedimgConfig) -> Strategy:
    return FedMedian(**common_kwargs(cfg))


@STRATEGIES.register()
def fedtrimmedavg(cfg: FedimgConfig) -> Strategy:
    return FedTrimmedAvg(**common_kwargs(cfg), beta=cfg.fl.trim_beta)


@STRATEGIES.register()
def krum(cfg: FedimgConfig) -> Strategy:
    return Krum(**common_kwargs(cfg), num_malicious_nodes=cfg.fl.num_malicious)


def build_strategy(cfg: FedimgConfig) -> Strategy:
    """The Flower strategy named by ``cfg.strategy``."""
    return STRATEGIES.get(cfg.strategy)(cfg)
