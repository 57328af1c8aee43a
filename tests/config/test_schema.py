"""The schema: frozen dataclasses, plain-string serialisation, decoding that validates."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fedimg.config import (
    Augment,
    Choice,
    DataConfig,
    FedimgConfig,
    HeterogeneityConfig,
    PrivacyConfig,
    decode,
    from_dict,
    from_json,
    to_dict,
    to_json,
    validate,
)
from fedimg.config.compose import compose_config
from fedimg.config.codec import field_types
from fedimg.errors import ConfigError


def _leaves(values: object) -> list[object]:
    if isinstance(values, dict):
        return [leaf for v in values.values() for leaf in _leaves(v)]
    if isinstance(values, list):
        return [leaf for v in values for leaf in _leaves(v)]
    return [values]


def _with(**sections: dict[str, object]) -> str:
    """JSON of the default config with ``section={key: value}`` changes (unvalidated)."""
    values = to_dict(FedimgConfig())
    for name, changes in sections.items():
        values[name].update(changes)
    return json.dumps(values)


SECTIONS = [name for name, kind in field_types(FedimgConfig).items()
            if dataclasses.is_dataclass(kind)]


def test_the_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FedimgConfig().rounds = 3  # type: ignore[misc]


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_is_frozen(section: str) -> None:
    part = getattr(FedimgConfig(), section)
    name = dataclasses.fields(part)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(part, name, getattr(part, name))


def test_a_changed_config_is_a_new_one() -> None:
    cfg = FedimgConfig()
    changed = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, target_epsilon=2))
    assert (cfg.privacy.target_epsilon, changed.privacy.target_epsilon) == (8.0, 2)


def test_to_dict_gives_plain_strings_for_enum_fields(tmp_path) -> None:
    cfg = compose_config("medical", [f"hydra.run.dir={tmp_path}", "privacy=dp_sgd"])
    assert isinstance(cfg.data.augment, Augment)
    values = to_dict(cfg)
    assert not any(isinstance(leaf, Choice) for leaf in _leaves(values))
    assert type(values["data"]["augment"]) is str and values["privacy"]["mode"] == "dp_sgd"


def test_json_round_trip_gives_enum_members_back(tmp_path) -> None:
    cfg = compose_config("medical", [f"hydra.run.dir={tmp_path}", "privacy=client_dp",
                                     "data.augment=strong", "compression.kind=int8"])
    back = from_json(to_json(cfg))
    assert back == cfg and back.data.augment is Augment.strong
    assert to_json(back) == to_json(cfg)


def test_enum_members_and_their_strings_give_the_same_digest() -> None:
    # Arrange: the same values, once as raw strings (hand-built), once as enum members
    from fedimg.serverapp.checkpoint import config_digest

    raw = FedimgConfig(data=DataConfig(augment="strong"),  # type: ignore[arg-type]
                       privacy=PrivacyConfig(accountant="rdp"))  # type: ignore[arg-type]
    typed = decode(to_dict(raw))
    # Assert: to_dict / JSON / digest see plain strings either way
    assert typed.data.augment is Augment.strong and type(raw.data.augment) is str
    assert to_json(typed) == to_json(raw)
    assert config_digest(typed) == config_digest(raw)


@pytest.mark.parametrize(("sections", "message"), [
    ({"train": {"batch_size": 0}}, r"^train.batch_size=0 must be >= 1$"),
    ({"data": {"augment": "wild"}}, r"^unknown augmentation preset 'wild' \(data.augment\); "
                                    r"valid: none, light, strong\. Fix: set data.augment"),
    ({"hetero": {"clock": "wall"}}, r"\(hetero.clock\); valid: simulated, real"),
    ({"train": {"batch_size": "32"}}, r"^train.batch_size='32' must be int\. Fix: give"),
    ({"fl": {"timeout_s": True}}, r"^fl.timeout_s=True must be float"),
    ({"faults": {"kill_at": [[1, "a"]]}}, r"^faults.kill_at\[0\]\[1\]='a' must be int"),
    ({"data": {"alpah": 0.3}}, r"^unknown config key 'data.alpah' in DataConfig; valid keys"),
])
def test_from_json_refuses_a_bad_value_naming_the_key(sections, message) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        from_json(_with(**sections))
    assert "\n" not in str(info.value)


def test_from_dict_validates_ranges_and_combinations() -> None:
    values = to_dict(FedimgConfig())
    values["privacy"]["mode"] = "dp_sgd"  # without transfer.bn=frozen
    with pytest.raises(ConfigError, match="needs transfer.bn=frozen"):
        from_dict(values)


def test_validate_refuses_a_hand_built_config_with_a_bad_closed_set_value() -> None:
    cfg = FedimgConfig(hetero=HeterogeneityConfig(clock="wall"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"unknown clock 'wall' \(hetero.clock\)"):
        validate(cfg)


def test_from_json_converts_whole_numbers_of_float_fields() -> None:
    cfg = from_json(_with(train={"lr": 1}))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_malformed_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="config JSON is malformed"):
        from_json("{not json")
