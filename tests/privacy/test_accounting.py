"""Privacy accounting: epsilon equals Opacus' accountants, composes, calibrates, budgets."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedimg.privacy.accounting import (
    PrivacyLedger,
    calibrate_sigma,
    default_delta,
    epsilon,
    new_ledger,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_epsilon_matches_opacus_accountants_stepped_by_hand() -> None:
    # Arrange: sigma=1.1, q=0.01, 500 steps, delta=1e-5, stepped one by one in Opacus
    rdp, prv = RDPAccountant(), PRVAccountant()
    for _ in range(500):
        rdp.step(noise_multiplier=1.1, sample_rate=0.01)
        prv.step(noise_multiplier=1.1, sample_rate=0.01)
    # Act
    ours_rdp = epsilon([(1.1, 0.01, 500)], 1e-5, "rdp")
    ours_prv = epsilon([(1.1, 0.01, 500)], 1e-5, "prv")
    # Assert: identical to Opacus, pinned, and PRV tighter than RDP
    assert ours_rdp == pytest.approx(rdp.get_epsilon(delta=1e-5), rel=1e-9)
    assert ours_prv == pytest.approx(prv.get_epsilon(delta=1e-5), rel=1e-6)
    assert ours_rdp == pytest.approx(1.3209, abs=1e-3)
    assert ours_prv == pytest.approx(1.0927, abs=2e-3)
    assert ours_prv < ours_rdp


def test_epsilon_composes_across_rounds() -> None:
    # Arrange: three rounds of 40 steps recorded separately
    ledger = PrivacyLedger(target_epsilon=10, delta=1e-5, noise_multiplier=0.9,
                           sample_rate=0.05, accountant="prv")
    spent = []
    for _ in range(3):
        ledger.record(40)
        spent.append(ledger.spent())
    # Assert: equal to one accountant over all 120 steps, and rising every round
    assert spent[-1] == pytest.approx(epsilon([(0.9, 0.05, 120)], 1e-5, "prv"), rel=1e-6)
    assert spent[0] < spent[1] < spent[2]
    assert ledger.steps == 120


def test_sigma_is_calibrated_once_for_the_whole_participation() -> None:
    # Act: sigma for 6 rounds x 20 steps, eps=4
    ledger = new_ledger(target_epsilon=4.0, delta=1e-4, sample_rate=0.05, planned_steps=120,
                        accountant="prv")
    # Assert: Opacus' own calibration; the budget is met after all steps, not after one round
    assert ledger.noise_multiplier == pytest.approx(get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-4, sample_rate=0.05, steps=120,
        accountant="prv"))
    ledger.record(120)
    assert 3.9 < ledger.spent() <= 4.0
    assert calibrate_sigma(target_epsilon=4.0, delta=1e-4, sample_rate=0.05, steps=20,
                           accountant="prv") < ledger.noise_multiplier


def test_budget_check_and_serialisation() -> None:
    ledger = new_ledger(target_epsilon=2.0, delta=1e-3, sample_rate=0.2, planned_steps=10,
                        accountant="rdp")
    ledger.record(10)
    # Assert: the planned participation fits; one more step does not
    assert not ledger.would_exceed(0)
    assert ledger.would_exceed(1)
    copy = PrivacyLedger.from_dict(ledger.to_dict())
    assert copy.spent() == pytest.approx(ledger.spent())
    report = ledger.report()
    assert report["dp/epsilon_rdp"] == report["dp/epsilon"]
    assert report["dp/epsilon_prv"] < report["dp/epsilon_rdp"]
    assert default_delta(500) == pytest.approx(2e-4)
