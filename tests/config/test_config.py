"""Composition of every scenario file, and validation errors (registry checks: test_resolve)."""

from __future__ import annotations

import pytest

from fedimg.config.compose import compose_config, list_scenarios, split_argv
from fedimg.config import FedimgConfig, from_json, to_json
from fedimg.errors import ConfigError


@pytest.mark.parametrize("scenario", list_scenarios())
def test_every_scenario_file_composes_and_validates(scenario: str, tmp_path) -> None:
    # Act
    cfg = compose_config(scenario, [f"hydra.run.dir={tmp_path}/run"])
    # Assert
    assert isinstance(cfg, FedimgConfig)
    assert cfg.name == scenario
    assert cfg.output.run_dir == str(tmp_path / "run")


def test_overrides_reach_nested_fields(tmp_path) -> None:
    cfg = compose_config("medical", ["rounds=3", "model=resnet18", "data.alpha=0.3",
                                     "sim.num_gpus_per_client=0.25",
                                     f"hydra.run.dir={tmp_path}"])
    assert (cfg.rounds, cfg.model, cfg.data.alpha) == (3, "resnet18", 0.3)
    assert cfg.sim.num_gpus_per_client == 0.25


def test_default_run_dir_is_per_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = compose_config("medical").output.run_dir
    second = compose_config("medical").output.run_dir
    assert first != second
    assert first.startswith(str(tmp_path / "runs" / "medical"))


def test_split_argv_separates_scenario() -> None:
    assert split_argv(["scenario=medical", "rounds=2"]) == ("medical", ["rounds=2"])
    with pytest.raises(ConfigError, match="key=value"):
        split_argv(["rounds"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.partitioner=zipf"], r"unknown partitioner 'zipf' \(data.partitioner\); valid: "
                                r"iid, dirichlet, quantity, shards, natural\. Fix: set"),
    (["data.alpha=0"], r"data.alpha=0.0 is impossible"),
    (["data.alpha=-1"], r"data.alpha=-1.0 is impossible"),
    (["fl.fraction_train=1.5"], r"fl.fraction_train=1.5 is impossible"),
    (["fl.min_train_clients=9"], r"must be between 1 and clients=5"),
    (["rounds=0"], r"rounds=0 is impossible"),
    (["rounds=abc"], r"rounds=abc.*Integer"),
    (["data.nope=1"], r"data.nope"),
    (["train.restricted_softmax=1.5"], r"train.restricted_softmax=1.5 must be in \[0, 1\]"),
    (["train.restricted_softmax=0.5", "privacy=dp_sgd"], r"mask of locally present classes"),
    (["train.calibration_tau=-1"], r"train.calibration_tau=-1.0 must be >= 0"),
    (["train.calibration_tau=0.1", "privacy=dp_sgd"], r"calibration comes from the private"),
    (["hetero.availability=1.2"], r"hetero.availability=1.2 is impossible"),
    (["deploy.enabled=true", "hetero.dropout=0.1"], r"hetero.\* simulates unreliable devices"),
])
def test_bad_values_are_refused_in_one_line(overrides, message, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        compose_config("medical", [*overrides, f"hydra.run.dir={tmp_path}"])
    assert "\n" not in str(info.value)


def test_unknown_scenario_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown scenario 'medicl'; valid names: .*medical"):
        compose_config("medicl")


def test_malformed_scenario_file_is_a_config_error(tmp_path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("defaults:\n  - fedimg_schema\n  - _self_\nrounds: [1, 2\n")
    with pytest.raises(ConfigError, match="broken"):
        compose_config(str(bad))


def test_json_round_trip_is_exact(tmp_path) -> None:
    cfg = compose_config("medical", [f"hydra.run.dir={tmp_path}", "data.alpha=0.25"])
    assert from_json(to_json(cfg)) == cfg


@pytest.mark.parametrize(("overrides", "message"), [
    (["sim.num_gpus_per_client=-1"], r"num_gpus_per_client=-1.0 must be"),
    (["train.device=cuda"], r"Ray hides GPUs"),
    (["fl.tau=0"], r"fl.tau=0.0 must be > 0"),
    (["data.min_partition_size=1"], r"BatchNorm cannot train on a single sample"),
])
def test_more_impossible_values(overrides, message, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config("medical", [*overrides, f"hydra.run.dir={tmp_path}"])


def test_model_selection_may_not_use_the_test_split(tmp_path) -> None:
    with pytest.raises(ConfigError, match="the test split must not select models"):
        compose_config("medical", ["output.select_metric=test/accuracy",
                                   f"hydra.run.dir={tmp_path}"])


@pytest.mark.parametrize("preset, mode", [("dp_sgd", "dp_sgd"), ("client_dp", "client_dp"),
                                          ("none", "none")])
def test_privacy_preset_applies_after_the_scenario(preset, mode, tmp_path) -> None:
    # medical trains BatchNorm; the DP presets freeze it, and overrides still win after
    cfg = compose_config("medical", [f"privacy={preset}", "privacy.target_epsilon=3",
                                     f"hydra.run.dir={tmp_path}"])
    assert cfg.privacy.mode == mode and cfg.privacy.target_epsilon == 3.0
    assert cfg.transfer.bn == ("train" if mode == "none" else "frozen")


@pytest.mark.parametrize(("overrides", "message"), [
    (["privacy=dp_sgdd"], r"privacy.*dp_sgd"),
    (["privacy=dp_sgd", "transfer.bn=train"], r"needs transfer.bn=frozen"),
    (["privacy=dp_sgd", "strategy=fedprox"], r"drops the term this strategy adds"),
    (["privacy=dp_sgd", "privacy.target_epsilon=0"], r"target_epsilon=0.0 must be > 0"),
    (["privacy=dp_sgd", "privacy.target_delta=1.5"], r"target_delta=1.5 must be in"),
    (["privacy=dp_sgd", "privacy.client_epsilons=[1,2]"], r"needs 5 positive values"),
    (["privacy=dp_sgd", "privacy.accountant=gdp"], r"valid: prv, rdp"),
    (["privacy.mode=dp"], r"unknown privacy mode 'dp'.*none, dp_sgd, client_dp"),
])
def test_bad_privacy_settings_are_refused(overrides, message, tmp_path) -> None:
    from fedimg.resolve import compose_and_check  # strategy facts need the registries

    with pytest.raises(ConfigError, match=message) as info:
        compose_and_check("medical", [*overrides, f"hydra.run.dir={tmp_path}"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides", [
    ["attack.byzantine_fraction=0.2"],
    ["faults.kill_at=[[1,0]]"],
    ["data.source=synthetic"],
    ["data.dataset=synthetic"],
])
def test_simulation_only_settings_are_refused_in_a_deployment(overrides) -> None:
    with pytest.raises(ConfigError, match="deploy.enabled=true"):
        compose_config("medical", ["deploy.enabled=true", *overrides])
