"""fedimg.resolve: names resolved through their registries, and registry-fact combinations."""

from __future__ import annotations

import dataclasses

import pytest

from fedimg.config import FedimgConfig, from_json, to_json, validate
from fedimg.config.compose import compose_config
from fedimg.errors import ConfigError
from fedimg.resolve import check_registries, compose_and_check


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=resnet19"], r"unknown model 'resnet19' \(model\); valid names: .*resnet18"),
    (["strategy=fedfoo"], r"unknown strategy 'fedfoo'.*fedavg, fedavgm"),
    (["data.dataset=mnistt"], r"unknown dataset 'mnistt'.*pneumoniamnist"),
    (["privacy=client_dp", "hetero.availability=0.9"], "every sampled client replied"),
    (["privacy=dp_sgd", "fl.personalize_steps=3"], "outside DP-SGD"),
    (["privacy=dp_sgd", "hetero.clock=real", "hetero.deadline_s=5"], "spent budget"),
])
def test_registry_checks_refuse_in_one_line(overrides, message, tmp_path) -> None:
    # Arrange: the config layer alone accepts it (it knows no registry)
    argv = [*overrides, f"hydra.run.dir={tmp_path}"]
    compose_config("medical", argv)
    # Act / Assert
    with pytest.raises(ConfigError, match=message) as info:
        compose_and_check("medical", argv)
    assert "\n" not in str(info.value)


def test_a_good_config_passes_and_is_returned(tmp_path) -> None:
    cfg = compose_and_check("medical", [f"hydra.run.dir={tmp_path}", "privacy=dp_sgd"])
    assert check_registries(cfg) is cfg


def test_a_decoded_config_with_an_unknown_model_is_refused_by_the_resolver() -> None:
    # Arrange: a client decodes the config it was sent; validate passes (open set)
    cfg = from_json(to_json(dataclasses.replace(FedimgConfig(), model="vgg99")))
    # Act / Assert
    with pytest.raises(ConfigError, match=r"unknown model 'vgg99' \(model\)"):
        check_registries(cfg)


def test_validate_alone_accepts_unknown_open_set_names() -> None:
    cfg = dataclasses.replace(FedimgConfig(), model="vgg99", strategy="fedfoo")
    assert validate(cfg) is cfg
