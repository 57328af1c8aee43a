"""The strategy registry builds Flower's own strategies with the configured settings."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.serverapp import strategy as flwr_strategy

from fedimg.config import FederationConfig, FedimgConfig
from fedimg.errors import ConfigError
from fedimg.transport.records import metric_record, reply_content
from fedimg.serverapp.strategies import STRATEGIES, build_strategy


def _reply(arrays: dict[str, np.ndarray], n: int) -> Message:
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    content = reply_content(metrics=metric_record({}, num_examples=n), arrays=record)
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)

EXPECTED = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam",
            "fedyogi": "FedYogi", "fedavgm": "FedAvgM", "fedmedian": "FedMedian",
            "fedtrimmedavg": "FedTrimmedAvg", "krum": "Krum", "multikrum": "MultiKrum"}


@pytest.mark.parametrize(("name", "cls"), sorted(EXPECTED.items()))
def test_registry_builds_flower_strategies(name: str, cls: str) -> None:
    strategy = build_strategy(FedimgConfig(strategy=name))
    assert isinstance(strategy, getattr(flwr_strategy, cls))


def test_every_required_strategy_is_registered() -> None:
    assert set(EXPECTED) <= set(STRATEGIES.names())


def test_settings_reach_the_strategy_and_sampling_stays_with_the_loop() -> None:
    cfg = FedimgConfig(strategy="fedprox", clients=10,
                       fl=FederationConfig(proximal_mu=0.5, fraction_train=0.3,
                                           min_train_clients=3))
    strategy = build_strategy(cfg)
    assert strategy.proximal_mu == 0.5
    # The round loop samples 3 of 10 itself; the strategy configures every node it is shown.
    assert (strategy.fraction_train, strategy.min_train_nodes) == (1.0, 1)
    assert (strategy.fraction_evaluate, strategy.min_available_nodes) == (1.0, 1)


def test_a_strategys_facts_live_in_its_registry_entry() -> None:
    # Arrange / Act
    specs = {name: STRATEGIES.get(name) for name in ("fedavg", "fedprox", "fedadam", "krum",
                                                     "fedtrimmedavg", "fedmedian")}
    cfg = FedimgConfig(fl=FederationConfig(num_malicious=2, trim_beta=0.2))
    # Assert: Krum n > 2f + 2 = 6 -> 7; trimmed mean n >= 1/0.2 = 5; median of 3.
    assert specs["krum"].min_replies(cfg) == 7
    assert specs["fedtrimmedavg"].min_replies(cfg) == 5
    assert specs["fedmedian"].min_replies(cfg) == 3
    assert specs["fedavg"].min_replies(cfg) == 1
    assert (specs["fedadam"].server_lr, specs["fedavg"].server_lr) == (0.01, 1.0)
    assert specs["fedavg"].averages and specs["fedprox"].averages
    assert not specs["krum"].averages
    assert specs["fedprox"].loss_term and not specs["fedavg"].loss_term


def test_fedadam_gets_its_own_server_lr_default() -> None:
    assert build_strategy(FedimgConfig(strategy="fedadam")).eta == pytest.approx(0.01)
    cfg = FedimgConfig(strategy="fedadam", fl=FederationConfig(server_lr=0.1))
    assert build_strategy(cfg).eta == pytest.approx(0.1)


def test_unknown_strategy_lists_names() -> None:
    with pytest.raises(ConfigError, match="valid names: fedadam, fedavg"):
        build_strategy(FedimgConfig(strategy="nope"))


def test_server_optimisers_average_buffers_instead_of_stepping_them() -> None:
    # Arrange: two clients, equal weight; "w" is a parameter, "bn.running_var" a buffer.
    strategy = build_strategy(FedimgConfig(strategy="fedadam"),
                              buffer_keys=["bn.running_var"])
    start = {"w": np.zeros(2, np.float32), "bn.running_var": np.full(2, 0.001, np.float32)}
    strategy.current_arrays = dict(start)
    replies = [_reply({"w": np.ones(2, np.float32),
                       "bn.running_var": np.full(2, 0.002, np.float32)}, 1),
               _reply({"w": np.ones(2, np.float32),
                       "bn.running_var": np.full(2, 0.004, np.float32)}, 1)]
    # Act
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: the buffer is the plain mean (0.003); the parameter took an Adam step
    # of eta_norm * m / (sqrt(v) + tau) with m = 0.1, v = 0.01 -> 0.01 * 0.1 / 0.101 * c.
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), [0.003, 0.003], rtol=1e-6)
    assert 0.0 < arrays["w"].numpy()[0] < 1.0


def test_plain_fedadam_would_push_small_variances_negative() -> None:
    # The reason for the mixin: Adam's normalised step is ~eta_norm (0.0074 in round 1)
    # whatever the scale once |delta| >> tau, so a small variance that shrinks a little
    # (0.001 -> 0.0009) is pushed below zero.
    cfg = FedimgConfig(strategy="fedadam", fl=FederationConfig(tau=1e-6))
    strategy = build_strategy(cfg)
    strategy.current_arrays = {"bn.running_var": np.full(2, 0.001, np.float32)}
    replies = [_reply({"bn.running_var": np.full(2, 0.0009, np.float32)}, 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert (arrays["bn.running_var"].numpy() < 0).all()


def test_krum_refuses_too_few_clients_for_its_guarantee() -> None:
    cfg = FedimgConfig(strategy="krum", clients=5, fl=FederationConfig(num_malicious=2))
    with pytest.raises(ConfigError, match=r"krum needs at least 7 updates per round .* but 5"):
        build_strategy(cfg)


def test_robust_strategies_need_enough_replies_to_stay_robust() -> None:
    from fedimg.serverapp.strategies import min_replies

    fl = FederationConfig(num_malicious=2, trim_beta=0.2)
    assert min_replies(FedimgConfig(strategy="krum", clients=10, fl=fl)) == 7  # 2f + 3
    assert min_replies(FedimgConfig(strategy="fedtrimmedavg", clients=10, fl=fl)) == 5
    assert min_replies(FedimgConfig(strategy="fedmedian", clients=10, fl=fl)) == 3
    assert min_replies(FedimgConfig(strategy="fedavg", clients=10, fl=fl)) == 1
    # Three sampled clients cannot trim 20% at each end: refused before round 1.
    with pytest.raises(ConfigError, match="fedtrimmedavg needs at least 5 updates"):
        build_strategy(FedimgConfig(strategy="fedtrimmedavg", clients=3,
                                    fl=FederationConfig(min_train_clients=2)))


def test_multikrum_averages_the_best_scored_updates() -> None:
    # Five clients, f=1: Krum scores each update by its squared distances to its
    # n - f - 2 = 2 nearest others: 0 -> .0325, .1 -> .0125, .2 -> .0125, 10 -> 96+,
    # .15 -> .005. The three best (.15, .1, .2) average to .15; 10 is never chosen.
    cfg = FedimgConfig(strategy="multikrum", clients=5,
                       fl=FederationConfig(num_malicious=1, krum_select=3))
    strategy = build_strategy(cfg)
    replies = [_reply({"w": np.array([v], np.float32)}, 10) for v in (0, .1, .2, 10, .15)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["w"].numpy()[0] == pytest.approx(0.15, abs=1e-6)
    default = build_strategy(FedimgConfig(strategy="multikrum", clients=5,
                                          fl=FederationConfig(num_malicious=1)))
    assert default.num_nodes_to_select == 4  # sampled - f
