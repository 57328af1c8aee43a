"""``sim.cohort_size``: its range, and each setting a cohort refuses (one line each)."""

from __future__ import annotations

import pytest

from fedimg.errors import ConfigError
from fedimg.resolve import compose_and_check

COHORT = "sim.cohort_size=4"


@pytest.mark.parametrize(("overrides", "says"), [
    (["sim.cohort_size=0"], "sim.cohort_size=0 is impossible: valid 1 \\(off\\) to 64"),
    (["sim.cohort_size=65"], "sim.cohort_size=65 is impossible: valid 1 \\(off\\) to 64"),
    ([COHORT, "deploy.enabled=true"], "with deploy.enabled=true: a deployed site is one client"),
    ([COHORT, "privacy.mode=client_dp"], "with privacy.mode=client_dp: privacy is accounted"),
    ([COHORT, "fl.local_bn=true"], "with fl.local_bn=true: FedBN keeps each client's"),
    ([COHORT, "compression.kind=int8"], "with compression.kind=int8: error feedback"),
    ([COHORT, "fl.secure_aggregation=secaggplus"], "with fl.secure_aggregation=secaggplus"),
    ([COHORT, "attack.byzantine_fraction=0.2"], "with attack.\\*: attacks are simulated"),
    ([COHORT, "train.optimizer=adamw"], "with train.optimizer=adamw: a cohort trains"),
    ([COHORT, "hetero.clock=real"], "with hetero.clock=real: a cohort replies as one"),
    ([COHORT, "strategy=scaffold"], "with strategy=scaffold: it sends each client arrays"),
    ([COHORT, "strategy=feddyn"], "with strategy=feddyn: it sends each client arrays"),
])
def test_a_cohort_refuses_with_one_line_naming_value_reason_and_fix(overrides, says):
    with pytest.raises(ConfigError, match=says) as caught:
        compose_and_check("medical", overrides)
    message = str(caught.value)
    assert "\n" not in message and "Fix: " in message


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fednova"])
def test_a_cohort_runs_with_strategies_that_send_one_content(strategy):
    cfg = compose_and_check("medical", ["sim.cohort_size=8", f"strategy={strategy}"])
    assert cfg.sim.cohort_size == 8


def test_cohorts_are_off_by_default():
    assert compose_and_check("medical").sim.cohort_size == 1
