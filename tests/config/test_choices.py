"""The closed-set enums: equal to their registries, and usable wherever a string was."""

from __future__ import annotations

import json

import pytest

from fedimg.config import (
    CHOICES,
    Accountant,
    AttackKind,
    Augment,
    BatchNorm,
    Choice,
    Clipping,
    Clock,
    Compression,
    GradSampleMode,
    LocalBudget,
    OnCorrupt,
    Optimizer,
    Partitioner,
    PrivacyKind,
    Schedule,
    TransferMode,
)
from fedimg.errors import ConfigError


def _registry_names() -> dict[type[Choice], list[str]]:
    """What each enum must equal: its registry's keys, or the constant its module checks."""
    from fedimg.data.decode import ON_CORRUPT
    from fedimg.data.partitioners import PARTITIONERS
    from fedimg.data.transforms import AUGMENTATIONS
    from fedimg.models.transfer import BN_MODES, MODES
    from fedimg.models.zoo import DP_GRAD_SAMPLE_MODES
    from fedimg.privacy import PRIVACY_MODES
    from fedimg.privacy.accounting import ACCOUNTANTS
    from fedimg.privacy.client_dp import CLIPPING
    from fedimg.simulation.attacks import ATTACKS
    from fedimg.training.budget import LOCAL_BUDGETS
    from fedimg.training.optim import OPTIMIZERS, SCHEDULES
    from fedimg.transport.codecs import CODECS

    return {
        Partitioner: PARTITIONERS.names(), Augment: AUGMENTATIONS.names(),
        Optimizer: OPTIMIZERS.names(), Schedule: SCHEDULES.names(),
        AttackKind: ATTACKS.names(), PrivacyKind: PRIVACY_MODES.names(),
        Compression: ["none", *CODECS.names()], Clipping: CLIPPING.names(),
        Accountant: list(ACCOUNTANTS), TransferMode: list(MODES), BatchNorm: list(BN_MODES),
        GradSampleMode: ["auto", *DP_GRAD_SAMPLE_MODES], OnCorrupt: list(ON_CORRUPT),
        LocalBudget: list(LOCAL_BUDGETS),
    }


@pytest.mark.parametrize("enum", list(_registry_names()), ids=lambda e: e.__name__)
def test_each_enum_equals_its_registry(enum: type[Choice]) -> None:
    assert sorted(enum.values()) == sorted(_registry_names()[enum])


@pytest.mark.parametrize("enum", CHOICES, ids=lambda e: e.__name__)
def test_member_names_equal_values_so_omegaconf_finds_them(enum: type[Choice]) -> None:
    assert all(member.name == member.value for member in enum)
    assert enum.label  # names the kind of value in error messages


def test_members_compare_hash_and_print_like_their_values() -> None:
    assert Augment.light == "light" and "light" == Augment.light
    assert hash(Augment.light) == hash("light")
    assert {"light": 1}[Augment.light] == 1 and Augment.light in {"light"}
    assert (str(Clock.real), f"{Clock.real}", f"{Clock.real:>6}") == ("real", "real", "  real")
    assert json.dumps({Augment.none: Augment.strong}) == '{"none": "strong"}'


def test_registry_lookup_by_member_finds_the_entry() -> None:
    from fedimg.data.partitioners import PARTITIONERS
    from fedimg.simulation.attacks import ATTACKS

    assert PARTITIONERS.get(Partitioner.dirichlet) is PARTITIONERS.get("dirichlet")
    assert ATTACKS.get(AttackKind.label_flip) is ATTACKS.get("label_flip")
    assert Partitioner.iid in PARTITIONERS


def test_parse_turns_a_value_into_its_member_or_names_key_value_and_fix() -> None:
    assert Clock.parse("real", key="hetero.clock") is Clock.real
    with pytest.raises(ConfigError) as info:
        Clock.parse("wall", key="hetero.clock")
    assert str(info.value) == ("unknown clock 'wall' (hetero.clock); valid: simulated, real. "
                               "Fix: set hetero.clock to one of them")


def test_omegaconf_lists_the_valid_values_of_a_bad_one() -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from fedimg.config import DataConfig

    schema = OmegaConf.structured(DataConfig, flags={"readonly": False})
    with pytest.raises(ValidationError, match=r"'wild', expected one of \[none, light, strong\]"):
        OmegaConf.merge(schema, {"augment": "wild"})
