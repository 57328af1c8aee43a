"""Who keeps a client's DP-SGD ledger between rounds: the site's disk, or Flower's context.

A deployed site keeps it in its own :class:`~fedimg.privacy.site_ledger.SiteLedger`
(its state dir, keyed by federation and site; every run's mechanisms compose into
its lifetime spend). A simulated client keeps it in ``context.state``, and after a
resume (fresh client processes) takes back the one the server's checkpoint holds.

Either way the keeper is a small filter around the privacy mode's round:

* :meth:`load` gives the ledger to continue (the site's own record wins over what
  the server offers, unless the offer records more);
* :meth:`admit` is called by DP-SGD with the ledger as it will be after this round,
  before its first noisy step: it returns why the round must be declined (the
  lifetime budget, the site's sigma floor), or writes the round ahead to disk;
* :meth:`save` stores the ledger after the round, before the reply leaves.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fedimg.clientapp.environment import TaskEnvironment
from fedimg.clientapp.policy import calibrated_sigma_problem
from fedimg.clientapp.site import SiteOptions
from fedimg.privacy import PRIVACY_MODES
from fedimg.privacy.site_ledger import LifetimeBudget, SiteLedger, extends


class Stash(Protocol):
    """Where a simulated client's ledger waits between rounds (its node's ``context.state``)."""

    def get(self) -> str | None:
        """The ledger JSON kept last round, or None."""
        ...

    def put(self, ledger_json: str) -> None:
        """Keep ``ledger_json`` for the next round."""
        ...


def _adopt(env: TaskEnvironment, partition_id: int, offered: dict[str, Any]) -> dict[str, Any]:
    adopt = PRIVACY_MODES.get(env.cfg.privacy.mode).adopt_ledger
    return offered if adopt is None else adopt(env, partition_id, offered)


@dataclass
class ContextLedger:
    """A simulated client's ledger in Flower's ``context.state`` (its node's memory)."""

    stash: Stash
    offered: dict[str, Any] | None  # what the server handed back, if anything
    env: TaskEnvironment
    partition_id: int

    def load(self) -> dict[str, Any] | None:
        """Its own ledger; else the one a resumed server hands back, checked."""
        kept = self.stash.get()
        if kept is not None:
            return json.loads(kept)
        offered = self.offered
        return None if offered is None else _adopt(self.env, self.partition_id, offered)

    def admit(self, planned: dict[str, Any]) -> str:
        """Nothing beyond the run's budget to check in simulation."""
        return ""

    def save(self, ledger: dict[str, Any]) -> None:
        self.stash.put(json.dumps(ledger))

    def report(self, ledger: dict[str, Any]) -> dict[str, float]:
        return {}


def run_key(env: TaskEnvironment) -> str:
    """The run a ledger belongs to: the same after a restart or a resume of that run."""
    cfg = env.cfg
    return hashlib.sha256(f"{cfg.name}|{cfg.output.run_dir}".encode()).hexdigest()[:16]


@dataclass
class SiteDiskLedger:
    """A deployed site's ledger on its own disk; the server's copy is only a report."""

    site: SiteOptions
    offered: dict[str, Any] | None
    env: TaskEnvironment
    store: SiteLedger = field(init=False)

    def __post_init__(self) -> None:
        self.store = open_site_ledger(self.site)
        self.key = run_key(self.env)

    @property
    def budget(self) -> LifetimeBudget | None:
        p = self.site.policy
        return None if p.lifetime_epsilon is None else LifetimeBudget(p.lifetime_epsilon,
                                                                      p.lifetime_delta)

    def load(self) -> dict[str, Any] | None:
        """The site's record of this run; an offer only if it records at least as much."""
        own, offered = self.store.run(self.key), self.offered
        if offered is not None and (own is None or extends(offered, own)):
            return _adopt(self.env, 0, offered)
        return own

    def admit(self, planned: dict[str, Any]) -> str:
        """Why this round must be declined, or "" after writing it ahead to disk."""
        problem = calibrated_sigma_problem(float(planned["noise_multiplier"]), self.site.policy)
        if not problem and self.budget is not None:
            after = self.store.lifetime_spent(self.budget, accountant=planned["accountant"],
                                              run_key=self.key, history=planned["history"])
            if after > self.budget.epsilon * (1 + 1e-6):
                problem = (f"lifetime privacy budget: epsilon would reach {after:.3f} > "
                           f"{self.budget.epsilon:g} (at delta {self.budget.delta:g}) in "
                           "this federation after this round")
        if not problem:
            self.store.record(self.key, planned)  # write-ahead: before any noisy step
        return problem

    def _new_steps(self, planned: dict[str, Any]) -> list[tuple[float, float, int]]:
        """The mechanisms ``planned`` adds to what the site has recorded for this run."""
        recorded = len((self.store.run(self.key) or {}).get("history", []))
        planned_history = [tuple(h) for h in planned.get("history", [])]
        own = [tuple(h) for h in (self.store.run(self.key) or {}).get("history", [])]
        return planned_history[recorded:] if planned_history[:recorded] == own \
            else planned_history

    def save(self, ledger: dict[str, Any]) -> None:
        """Store the round's ledger (fsynced) before the reply leaves the site."""
        own = self.store.run(self.key)
        if own is None or extends(ledger, own):
            self.store.record(self.key, ledger)

    def report(self, ledger: dict[str, Any]) -> dict[str, float]:
        """The site's lifetime spend, for the server's report."""
        if self.budget is None:
            return {}
        spent = self.store.lifetime_spent(self.budget, accountant=ledger["accountant"])
        return {"dp/lifetime_epsilon": spent, "dp/lifetime_target_epsilon": self.budget.epsilon}


def open_site_ledger(site: SiteOptions) -> SiteLedger:
    """The site's ledger of its federation (LedgerError if missing after training, corrupt)."""
    return SiteLedger.open(Path(site.state_dir), federation=site.federation or "default",
                           site=site.name)


def ledger_keeper(*, stash: Stash, offered: dict[str, Any] | None, env: TaskEnvironment,
                  partition_id: int, site: SiteOptions | None
                  ) -> ContextLedger | SiteDiskLedger:
    """The site's disk ledger when it has a state dir, else the stash (``context.state``)."""
    if site is not None and site.state_dir:
        return SiteDiskLedger(site=site, offered=offered, env=env)
    return ContextLedger(stash=stash, offered=offered, env=env, partition_id=partition_id)
