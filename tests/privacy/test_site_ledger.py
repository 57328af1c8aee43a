"""A site's ledger file: durable records, refusing to be lowered, lifetime composition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedimg.errors import LedgerError
from fedimg.privacy.accounting import epsilon
from fedimg.privacy.site_ledger import LifetimeBudget, SiteLedger, extends, ledger_path


def _ledger(history: list[list[float]], sigma: float = 1.1, q: float = 0.25) -> dict:
    return {"target_epsilon": 8.0, "delta": 1e-3, "noise_multiplier": sigma, "sample_rate": q,
            "accountant": "prv", "history": history, "stopped_round": None,
            "class_weights": None}


def test_a_recorded_ledger_reads_back_after_a_restart(tmp_path: Path) -> None:
    # Arrange
    book = SiteLedger.open(tmp_path, federation="fl.example.org:9092", site="hospital_a")
    # Act
    book.record("run-1", _ledger([[1.1, 0.25, 4]]))
    again = SiteLedger.open(tmp_path, federation="fl.example.org:9092", site="hospital_a")
    # Assert
    assert again.run("run-1") == _ledger([[1.1, 0.25, 4]])
    assert again.marker.is_file() and not list(again.path.parent.glob(".*.tmp"))
    assert ledger_path(tmp_path, federation="other", site="hospital_a") != again.path


def test_the_record_is_never_lowered(tmp_path: Path) -> None:
    # Arrange
    book = SiteLedger.open(tmp_path, federation="f", site="s")
    book.record("run-1", _ledger([[1.1, 0.25, 4]]))
    # Act / Assert: fewer steps, or another sigma, is refused; more is kept
    with pytest.raises(LedgerError, match="spends less"):
        book.record("run-1", _ledger([[1.1, 0.25, 3]]))
    with pytest.raises(LedgerError):
        book.record("run-1", _ledger([[1.1, 0.25, 8]], sigma=0.5))
    book.record("run-1", _ledger([[1.1, 0.25, 2], [1.1, 0.25, 4]]))  # merged: 6 >= 4
    assert book.run("run-1")["history"] == [[1.1, 0.25, 2], [1.1, 0.25, 4]]


@pytest.mark.parametrize("offered, ok", [
    ([[10.0, 1.0, 1], [1.1, 0.25, 4]], True),   # the same
    ([[10.0, 1.0, 1], [1.1, 0.25, 6]], True),   # more steps
    ([[10.0, 1.0, 1], [1.1, 0.25, 2], [1.1, 0.25, 2]], True),  # the same, unmerged
    ([[10.0, 1.0, 1]], False),                   # only the count prefix
    ([[10.0, 1.0, 1], [1.1, 0.25, 3]], False),  # one step short
    ([[1.1, 0.25, 5]], False),                   # the prefix dropped
])
def test_an_offer_is_accepted_only_if_it_records_at_least_as_much(offered, ok) -> None:
    own = _ledger([[10.0, 1.0, 1], [1.1, 0.25, 4]])
    assert extends(_ledger(offered), own) is ok


def test_the_lifetime_spend_composes_every_run(tmp_path: Path) -> None:
    # Arrange: two runs with different sigma and q
    book = SiteLedger.open(tmp_path, federation="f", site="s")
    book.record("run-1", _ledger([[1.1, 0.25, 4]]))
    book.record("run-2", _ledger([[2.0, 0.5, 3]], sigma=2.0, q=0.5))
    budget = LifetimeBudget(epsilon=20.0, delta=1e-5)
    # Act
    spent = book.lifetime_spent(budget, accountant="rdp")
    planned = book.lifetime_spent(budget, accountant="rdp", run_key="run-2",
                                  history=[(2.0, 0.5, 5)])
    # Assert: Opacus' own accountant over the concatenated history
    assert spent == pytest.approx(epsilon([(1.1, 0.25, 4), (2.0, 0.5, 3)], 1e-5, "rdp"))
    assert planned == pytest.approx(epsilon([(1.1, 0.25, 4), (2.0, 0.5, 5)], 1e-5, "rdp"))
    assert planned > spent > epsilon([(1.1, 0.25, 4)], 1e-5, "rdp")


@pytest.mark.parametrize("damage", ["truncated", "edited", "not_json"])
def test_a_damaged_file_is_refused_with_the_fix(tmp_path: Path, damage: str) -> None:
    # Arrange
    book = SiteLedger.open(tmp_path, federation="f", site="s")
    book.record("run-1", _ledger([[1.1, 0.25, 4]]))
    text = book.path.read_text()
    if damage == "truncated":
        book.path.write_text(text[: len(text) // 2])
    elif damage == "edited":
        raw = json.loads(text)
        raw["runs"]["run-1"]["history"] = []
        book.path.write_text(json.dumps(raw))
    else:
        book.path.write_text("[]")
    # Act
    with pytest.raises(LedgerError) as err:
        SiteLedger.open(tmp_path, federation="f", site="s")
    # Assert
    assert "refusing to train" in str(err.value) and "Fix: restore" in str(err.value)
