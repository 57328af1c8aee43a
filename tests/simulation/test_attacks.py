"""Simulated Byzantine clients and injected faults."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedimg.simulation.attacks import (
    malicious_clients,
    poisoned_labels,
    poisoned_update,
)
from fedimg.simulation.faults import inject_fault
from fedimg.config import AttackConfig, FaultsConfig, FedimgConfig, validate
from fedimg.errors import ConfigError


def _cfg(fraction: float, kind: str = "sign_flip", scale: float = 4.0,
         clients: int = 10, seed: int = 0) -> FedimgConfig:
    return FedimgConfig(clients=clients, seed=seed, attack=AttackConfig(
        byzantine_fraction=fraction, kind=kind, scale=scale))


def test_malicious_clients_are_a_seeded_fixed_share() -> None:
    assert malicious_clients(_cfg(0.0)) == frozenset()
    ten, thirty = malicious_clients(_cfg(0.1)), malicious_clients(_cfg(0.3))
    assert len(ten) == 1 and len(thirty) == 3
    assert thirty == malicious_clients(_cfg(0.3))  # same seed, same clients
    assert len(malicious_clients(_cfg(0.3, clients=7))) == 2  # round(2.1)
    others = {malicious_clients(_cfg(0.3, seed=s)) for s in range(5)}
    assert len(others) > 1


def test_sign_flip_and_scale_change_only_trained_parameters() -> None:
    global_state = {"w": torch.tensor([1.0, 1.0]), "bn.running_var": torch.tensor([1.0])}
    local = {"w": torch.tensor([1.5, 0.0]), "bn.running_var": torch.tensor([2.0])}
    cfg = _cfg(0.5, clients=2)
    bad = next(iter(malicious_clients(cfg)))
    flipped = poisoned_update(cfg, bad, global_state, local, frozenset({"w"}))
    # w_g - 4 (w_i - w_g) = 1 - 4 * (0.5, -1) = (-1, 5); the buffer is sent honestly
    assert flipped["w"].tolist() == [-1.0, 5.0]
    assert flipped["bn.running_var"].tolist() == [2.0]
    scaled = poisoned_update(_cfg(0.5, "scale", 10.0, clients=2), bad, global_state, local,
                             frozenset({"w"}))
    assert scaled["w"].tolist() == [6.0, -9.0]  # 1 + 10 * (0.5, -1)
    honest = 1 - bad
    assert poisoned_update(cfg, honest, global_state, local, frozenset({"w"}))["w"].tolist() \
        == [1.5, 0.0]


def test_label_flip_reverses_the_class_order_for_malicious_clients_only() -> None:
    cfg = _cfg(0.5, "label_flip", clients=2)
    bad = next(iter(malicious_clients(cfg)))
    labels = torch.tensor([0, 1, 2, 3])
    assert poisoned_labels(cfg, bad, labels, 4).tolist() == [3, 2, 1, 0]
    assert poisoned_labels(cfg, 1 - bad, labels, 4).tolist() == [0, 1, 2, 3]
    # label_flip does not touch updates
    state = {"w": torch.ones(2)}
    assert poisoned_update(cfg, bad, state, {"w": torch.zeros(2)},
                           frozenset({"w"}))["w"].tolist() == [0.0, 0.0]


def test_injected_raise_fires_only_at_its_round_and_client() -> None:
    cfg = FedimgConfig(rounds=3, clients=2, faults=FaultsConfig(raise_at=[[2, 1]]))
    inject_fault(cfg, 1, 1)
    inject_fault(cfg, 2, 0)
    with pytest.raises(RuntimeError, match="client 1 raises in round 2"):
        inject_fault(cfg, 2, 1)


def test_attack_and_fault_configs_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown attack 'flip'.*label_flip"):
        validate(dataclasses.replace(_cfg(0.1), attack=AttackConfig(0.1, "flip")))
    with pytest.raises(ConfigError, match="byzantine_fraction=1.0 must be in"):
        validate(_cfg(1.0))
    with pytest.raises(ConfigError, match=r"faults.kill_at entry \[9, 0\]"):
        validate(FedimgConfig(rounds=3, faults=FaultsConfig(kill_at=[[9, 0]])))
