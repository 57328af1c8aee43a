"""The strategy registry builds Flower's own strategies with the configured settings."""

from __future__ import annotations

import pytest
from flwr.serverapp import strategy as flwr_strategy

from fedimg.config import FederationConfig, FedimgConfig
from fedimg.errors import ConfigError
from fedimg.federation.strategies import STRATEGIES, build_strategy

EXPECTED = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam",
            "fedyogi": "FedYogi", "fedavgm": "FedAvgM", "fedmedian": "FedMedian",
            "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum"}


@pytest.mark.parametrize(("name", "cls"), sorted(EXPECTED.items()))
def test_registry_builds_flower_strategies(name: str, cls: str) -> None:
    strategy = build_strategy(FedimgConfig(strategy=name))
    assert type(strategy) is getattr(flwr_strategy, cls)


def test_every_required_strategy_is_registered() -> None:
    assert set(EXPECTED) <= set(STRATEGIES.names())


def test_settings_reach_the_strategy() -> None:
    cfg = FedimgConfig(strategy="fedprox", clients=10,
                       fl=FederationConfig(proximal_mu=0.5, fraction_train=0.3,
                                           min_train_clients=3))
    strategy = build_strategy(cfg)
    assert strategy.proximal_mu == 0.5
    assert strategy.fraction_train == 0.3
    assert strategy.min_train_nodes == 3


def test_fedadam_gets_its_own_server_lr_default() -> None:
    assert build_strategy(FedimgConfig(strategy="fedadam")).eta == pytest.approx(0.01)
    cfg = FedimgConfig(strategy="fedadam", fl=FederationConfig(server_lr=0.1))
    assert build_strategy(cfg).eta == pytest.approx(0.1)


def test_unknown_strategy_lists_names() -> None:
    with pytest.raises(ConfigError, match="valid names: fedadam, fedavg"):
        build_strategy(FedimgConfig(strategy="nope"))
