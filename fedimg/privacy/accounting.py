"""Privacy accounting with Opacus' accountants: calibration, ledgers, budgets.

A :class:`PrivacyLedger` is one participant's record of the Gaussian mechanisms it
has run: the Opacus accountant history ``[(sigma, q, steps), ...]`` plus its budget.
It serialises to a plain dict, so a client keeps it across rounds in Flower's
``context.state`` (a fresh accountant every round would restart epsilon at zero).
Epsilon is computed with the PRV accountant (Gopi et al. 2021, "Numerical
Composition of Differential Privacy", NeurIPS) by default and cross-checked with
RDP (Mironov 2017; Mironov et al. 2019 for the subsampled Gaussian).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
# Relative slack when comparing a spent epsilon to the budget: PRV's numerical bound
# differs in the last digits between equivalent histories.
_BUDGET_SLACK = 1e-6


def default_delta(num_samples: int) -> float:
    """delta = 0.1 / N: well below 1/N, as a meaningful (epsilon, delta) guarantee needs."""
    return 0.1 / max(1, num_samples)


def epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon spent by ``history`` at ``delta`` under Opacus' ``accountant`` ("prv"/"rdp").

    Memoised on the history with consecutive equal (sigma, q) entries merged, as
    Opacus merges them: a PRV evaluation takes up to a second, and a round asks for
    the same value twice (the budget check before training, the report after).
    """
    return _epsilon(tuple(merged_history(history)), float(delta), accountant)


def merged_history(history: Any) -> list[tuple[float, float, int]]:
    """``history`` with consecutive equal (sigma, q) entries merged, as Opacus merges them."""
    merged: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (float(sigma), float(q)):
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return merged


@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float,
             accountant: str) -> float:
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # noqa: PLC0415 - only runs that account

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def calibrate_sigma(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str, prefix: list[tuple[float, float, int]] | None = None,
                    tolerance: float = 0.01) -> float:
    """Smallest noise multiplier whose ``steps`` subsampled Gaussian steps stay within budget.

    Without ``prefix`` this is Opacus' ``get_noise_multiplier``. With earlier releases
    in ``prefix`` (e.g. the noisy label counts), sigma is found by bisection so that
    prefix and steps together spend at most ``target_epsilon``.
    """
    if not prefix:
        from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415

        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant))
    if epsilon(list(prefix), delta, accountant) >= target_epsilon:
        raise ValueError(f"the earlier releases alone spend more than epsilon={target_epsilon}")

    def spent(sigma: float) -> float:
        return epsilon([*prefix, (sigma, sample_rate, steps)], delta, accountant)

    low, high = 0.1, 10.0
    while spent(high) > target_epsilon:
        low, high = high, high * 4
    while spent(high) < target_epsilon - tolerance and high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (low, mid) if spent(mid) <= target_epsilon else (mid, high)
    return high


@dataclass
class PrivacyLedger:
    """One participant's budget and the mechanisms it has already run."""

    target_epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    accountant: str = "prv"
    history: list[tuple[float, float, int]] = field(default_factory=list)
    stopped_round: int | None = None
    class_weights: list[float] | None = None  # from noisy label counts (in the history)

    @property
    def steps(self) -> int:
        """Noisy steps taken so far."""
        return sum(int(h[2]) for h in self.history)

    def spent(self, accountant: str | None = None) -> float:
        """Epsilon spent so far (with the ledger's accountant unless another is named)."""
        return epsilon(self.history, self.delta, accountant or self.accountant)

    def cross_check(self) -> str:
        """The accountant that is not the ledger's own (reported beside it)."""
        return next(a for a in ACCOUNTANTS if a != self.accountant)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon if ``steps`` more steps at the ledger's (sigma, q) were taken."""
        extra = (self.noise_multiplier, self.sample_rate, steps)
        return epsilon([*self.history, extra], self.delta, self.accountant)

    def would_exceed(self, steps: int) -> bool:
        """True when ``steps`` more steps would spend more than the budget."""
        return self.epsilon_after(steps) > self.target_epsilon * (1 + _BUDGET_SLACK)

    def record(self, steps: int) -> None:
        """Add ``steps`` steps at the ledger's (sigma, q) (for mechanisms run elsewhere)."""
        if steps > 0:
            self.history.append((self.noise_multiplier, self.sample_rate, steps))

    def report(self) -> dict[str, float]:
        """Metrics for this round's record: epsilon under both accountants, delta, sigma, q."""
        spent = self.spent()
        return {f"dp/epsilon_{self.accountant}": spent,
                f"dp/epsilon_{self.cross_check()}": self.spent(self.cross_check()),
                "dp/epsilon": spent, "dp/delta": self.delta,
                "dp/sigma": self.noise_multiplier, "dp/sample_rate": self.sample_rate,
                "dp/target_epsilon": self.target_epsilon, "dp/steps_total": float(self.steps)}

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in Flower's context.state by the client)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`."""
        values = dict(values)
        values["history"] = [tuple(h) for h in values.get("history", [])]
        return cls(**values)


def new_ledger(*, target_epsilon: float, delta: float, sample_rate: float, planned_steps: int,
               accountant: str, noise_multiplier: float | None = None,
               prefix: list[tuple[float, float, int]] | None = None) -> PrivacyLedger:
    """A ledger whose sigma is calibrated once for the whole planned participation.

    Calibrating per round would give every round the full budget; calibrating for
    all ``planned_steps`` makes the final epsilon meet ``target_epsilon``. An explicit
    ``noise_multiplier`` is used as given, and the budget then stops the participant
    when it runs out. ``prefix`` holds releases made before training (they start the
    ledger's history and share the budget).
    """
    sigma = noise_multiplier
    if sigma is None:
        sigma = calibrate_sigma(target_epsilon=target_epsilon, delta=delta,
                                sample_rate=sample_rate, steps=planned_steps,
                                accountant=accountant, prefix=prefix)
        log.debug("calibrated sigma=%.4f for eps=%g delta=%.2e q=%.4f over %d steps", sigma,
                  target_epsilon, delta, sample_rate, planned_steps)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"noise multiplier {sigma} is not a positive number")
    return PrivacyLedger(target_epsilon=target_epsilon, delta=delta, noise_multiplier=sigma,
                         sample_rate=sample_rate, accountant=accountant,
                         history=list(prefix or []))
