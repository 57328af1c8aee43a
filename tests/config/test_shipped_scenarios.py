"""Every scenario in scenarios/ composes and validates, with what its comments promise."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedimg.resolve import compose_and_check

SCENARIOS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "scenarios")
                   .glob("*.yaml"))


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_shipped_scenario_composes_and_validates(name: str) -> None:
    cfg = compose_and_check(name, [])
    assert cfg.name == name and cfg.rounds >= 1


def test_hospitals_is_the_natural_split_of_ham_sites_with_the_closed_form_head() -> None:
    cfg = compose_and_check("hospitals", [])
    assert (cfg.data.dataset, cfg.data.path, cfg.data.partitioner, cfg.data.natural_column,
            cfg.clients) == ("folder", "ham_sites", "natural", "site", 4)
    assert (cfg.fl.head_init, cfg.fl.ridge_lambda, cfg.train.class_weighting) == \
        ("ridge", 0.1, "federated")
    assert (cfg.transfer.mode, cfg.transfer.bn, cfg.transfer.train_head, cfg.train.lr) == \
        ("full", "frozen", False, 0.0003)
    assert cfg.output.select_metric == "val/pooled_balanced_accuracy"


def test_cameras_fits_the_head_in_closed_form_and_tunes_blocks_under_it() -> None:
    cfg = compose_and_check("cameras", [])
    assert cfg.fl.head_init == "ridge" and not cfg.transfer.train_head
    assert (cfg.transfer.mode, cfg.transfer.bn, cfg.train.lr) == ("last_k", "frozen", 0.0005)
