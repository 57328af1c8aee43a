"""Malformed scenario files: one-line ConfigErrors naming the file, the line and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedimg.config.compose import compose_config, list_scenarios
from fedimg.config import FedimgConfig
from fedimg.errors import ConfigError

HEADER = "defaults:\n  - fedimg_schema\n  - _self_\n"  # lines 1-3; the body starts at line 4


def compose_text(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> FedimgConfig:
    """Write ``text`` to ``<tmp>/bad.yaml`` and compose it by path."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return compose_config(str(path), [*overrides, f"hydra.run.dir={tmp_path}/run"])


def refused(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    """The message of the ConfigError that composing ``text`` raises (asserted one line)."""
    with pytest.raises(ConfigError) as info:
        compose_text(tmp_path, text, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("body", "expected"), [
    ("rounds: [1, 2\n", "invalid YAML at line 5, column 1: expected ',' or ']'"),
    ("rounds: 3\n\tclients: 2\n", "invalid YAML at line 5, column 1: found character '\\t'"),
    ("data:\n  alpha: 0.1\n  alpha: 0.2\n", "line 6, column 3: found duplicate key alpha"),
    ("rounds: 2\n---\nrounds: 3\n", "invalid YAML at line 5"),
])
def test_invalid_yaml_names_the_file_and_line(tmp_path: Path, body: str, expected: str) -> None:
    message = refused(tmp_path, HEADER + body)
    assert f"scenario file {tmp_path / 'bad.yaml'}" in message
    assert expected in message
    assert "Fix: correct the YAML" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("- rounds: 3\n- clients: 2\n", "line 1: the top level is a list, not a mapping"),
    ("just some words\n", "line 1: the top level is a single value, not a mapping"),
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
])
def test_a_scenario_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str,
                                                     expected: str) -> None:
    message = refused(tmp_path, text)
    assert f"scenario file {tmp_path / 'bad.yaml'}" in message and expected in message
    assert "defaults: [fedimg_schema, _self_]" in message


def test_unknown_top_level_key_gives_line_suggestion_and_valid_keys(tmp_path: Path) -> None:
    message = refused(tmp_path, HEADER + "name: x\nroundz: 3\n")
    assert f"scenario file {tmp_path / 'bad.yaml'}, line 5: unknown key 'roundz'" in message
    assert "(did you mean 'rounds'?)" in message
    assert "valid keys of FedimgConfig: name, description, seed, rounds, clients" in message


def test_unknown_nested_key_names_its_section(tmp_path: Path) -> None:
    message = refused(tmp_path, HEADER + "data:\n  dataset: retinamnist\n  alpah: 0.3\n")
    assert "line 6: unknown key 'data.alpah' (did you mean 'alpha'?)" in message
    assert "valid keys of DataConfig:" in message and "on_corrupt" in message


@pytest.mark.parametrize(("body", "expected"), [
    ("rounds: ten\n", "line 4: rounds='ten' must be int"),
    ("data:\n  alpha: lots\n", "line 5: data.alpha='lots' must be float"),
    ("data:\n  max_train_samples: many\n", "line 5: data.max_train_samples='many' must be "
                                           "int or null"),
])
def test_wrong_type_names_line_value_and_expected_type(tmp_path: Path, body: str,
                                                       expected: str) -> None:
    message = refused(tmp_path, HEADER + body)
    assert f"scenario file {tmp_path / 'bad.yaml'}, {expected}" in message
    assert "Fix: give" in message


def test_a_scenario_without_the_schema_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, "rounds: 3\n")
    assert "does not build on the config schema" in message
    assert "defaults: [fedimg_schema, _self_]" in message


def test_a_bad_override_is_blamed_on_the_override_not_the_file(tmp_path: Path) -> None:
    message = refused(tmp_path, HEADER + "rounds: 3\n", ("rounds=ten",))
    assert "Error merging override rounds=ten" in message
    assert "line" not in message


def test_a_good_file_outside_scenarios_composes_with_a_preset(tmp_path: Path) -> None:
    cfg = compose_text(tmp_path, HEADER + "rounds: 2\nclients: 3\n", ("privacy=dp_sgd",))
    assert (cfg.rounds, cfg.clients, cfg.privacy.mode) == (2, 3, "dp_sgd")


def test_unknown_scenario_name_lists_every_valid_name() -> None:
    with pytest.raises(ConfigError) as info:
        compose_config("medicl")
    message = str(info.value)
    assert "unknown scenario 'medicl'; valid names: " in message
    assert message.endswith(", ".join(list_scenarios()))


def test_a_missing_preset_lists_the_available_ones(tmp_path: Path) -> None:
    message = refused(tmp_path, HEADER + "rounds: 2\n", ("privacy=dp_sgdd",))
    assert "privacy/dp_sgdd" in message and "available: client_dp, distributed_dp, dp_sgd, none" in message


@pytest.mark.parametrize(("body", "expected"), [
    ("data:\n  augment: wild\n", "line 5: unknown augmentation preset 'wild' (data.augment); "
                                 "valid: none, light, strong. Fix: set data.augment"),
    ("hetero:\n  clock: wall\n", "line 5: unknown clock 'wall' (hetero.clock); valid: "
                                 "simulated, real"),
    ("privacy:\n  mode: DP_SGD\n", "line 5: unknown privacy mode 'DP_SGD' (privacy.mode); "
                                   "valid: none, dp_sgd, client_dp"),
    ("compression:\n  kind: 7\n", "line 5: unknown compression '7' (compression.kind); "
                                  "valid: none, fp16, int8, topk"),
])
def test_a_bad_closed_set_value_in_the_file_names_line_value_and_valid_ones(
        tmp_path: Path, body: str, expected: str) -> None:
    message = refused(tmp_path, HEADER + body)
    assert f"scenario file {tmp_path / 'bad.yaml'}, {expected}" in message


@pytest.mark.parametrize(("override", "expected"), [
    ("data.augment=wild", "unknown augmentation preset 'wild' (data.augment); valid: none, "
                          "light, strong. Fix: set data.augment to one of them"),
    ("train.optimizer=adam", "unknown optimizer 'adam' (train.optimizer); valid: sgd, adamw"),
    ("attack.kind=flip", "unknown attack 'flip' (attack.kind); valid: sign_flip, scale, "
                         "label_flip"),
])
def test_a_bad_closed_set_override_names_key_value_and_valid_ones(
        tmp_path: Path, override: str, expected: str) -> None:
    message = refused(tmp_path, HEADER + "rounds: 2\n", (override,))
    assert message.startswith(f"bad config for scenario '{tmp_path / 'bad.yaml'}': {expected}")
    assert message.endswith("to one of them") and "line" not in message


def test_a_closed_set_value_composes_as_its_enum_member(tmp_path: Path) -> None:
    from fedimg.config import Augment, Clock

    cfg = compose_text(tmp_path, HEADER + "hetero:\n  clock: real\n", ("data.augment=none",))
    assert cfg.hetero.clock is Clock.real and cfg.data.augment is Augment.none


def test_the_simulate_command_prints_one_line_for_a_bad_augment(tmp_path: Path) -> None:
    # Act
    result = subprocess.run([sys.executable, "-m", "fedimg.simulate", "scenario=medical",
                             "data.augment=wild", f"hydra.run.dir={tmp_path}/run"],
                            capture_output=True, text=True, timeout=120)
    # Assert: exit code 2 (ConfigError), one line with the key, the value and the valid ones
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "data.augment" in lines[0] and "'wild'" in lines[0]
    assert "valid: none, light, strong" in lines[0]
