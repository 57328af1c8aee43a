"""``fl.personal``: its ranges, and each setting a personal mode refuses (one line each)."""

from __future__ import annotations

import pytest

from fedimg.resolve import compose_and_check
from refusals import assert_refused_in_one_line


@pytest.mark.parametrize(("overrides", "says"), [
    (["fl.personal=fedrep", "fl.fedrep_head_steps=-1"], "fl.fedrep_head_steps=-1 is impossible"),
    (["fl.personal=ditto", "fl.ditto_lambda=-0.5"], "fl.ditto_lambda=-0.5 is impossible"),
    (["fl.personal=ditto", "fl.secure_aggregation=secaggplus"],
     "fl.personal=ditto with fl.secure_aggregation=secaggplus: the server sees only"),
    (["fl.personal=fedper", "privacy.mode=client_dp"],
     "fl.personal=fedper with privacy.mode=client_dp: the personal part trains"),
    (["fl.personal=ditto", "privacy.mode=dp_sgd"], "with privacy.mode=dp_sgd"),
    (["fl.personal=fedrep", "sim.cohort_size=4"], "with sim.cohort_size=4: a cohort's members"),
    (["fl.personal=fedper", "fl.local_bn=true"], "with fl.local_bn=true: FedBN also keeps"),
    (["fl.personal=ditto", "fl.personalize_steps=5"],
     "with fl.personalize_steps=5: both report val/personal_"),
    (["fl.personal=fedper", "transfer.mode=head"], "with transfer.mode=head: only the head"),
    (["fl.personal=fedrep", "transfer.train_head=false"],
     "fl.personal=fedrep with transfer.train_head=false: the personal part is the head"),
    (["fl.personal=fedrep", "strategy=scaffold"],
     "strategy=scaffold with fl.personal=fedrep: it reads each client's update"),
    (["fl.personal=ditto", "strategy=local"], "strategy=local with fl.personal=ditto: a "
     "baseline trains in-process"),
    (["fl.personal=wild"], "unknown personalisation 'wild'"),
])
def test_a_personal_mode_refuses_with_one_line_naming_value_reason_and_fix(overrides, says):
    assert_refused_in_one_line(overrides, says)


@pytest.mark.parametrize("overrides", [
    ["fl.personal=ditto", "transfer.mode=head"],  # a personal linear probe: fine
    ["fl.personal=ditto", "strategy=scaffold"],  # w trains as the strategy says
    ["fl.personal=fedrep", "strategy=fedadam", "transfer.mode=last_k"],
    ["fl.personal=ditto", "transfer.train_head=false"],  # Ditto keeps a whole model
])
def test_what_a_personal_mode_allows_composes(overrides):
    assert compose_and_check("medical", overrides).fl.personal == overrides[0].split("=")[1]


def test_personalisation_is_off_by_default():
    cfg = compose_and_check("medical", [])
    assert (cfg.fl.personal, cfg.fl.fedrep_head_steps, cfg.fl.ditto_lambda) == ("none", 0, 0.1)
