"""A deployed site's own privacy ledger, on its own disk: every mechanism it ever ran.

The server's copy of a ledger is a report, never an authority. A site keeps one
file per federation under its state dir (``<state_dir>/privacy/<federation>/<site>.json``)
holding each run's :class:`~fedimg.privacy.accounting.PrivacyLedger`, keyed by run.
Its lifetime spend is the composition of every run's history at the site's
lifetime delta (heterogeneous subsampled Gaussians compose under the PRV and RDP
accountants; Gopi et al. 2021, Mironov et al. 2019), so what a site spends across
runs, restarts and resumes adds up.

Writes are atomic and durable: a temporary file, ``fsync``, ``os.replace``, then an
``fsync`` of the folder. A round is written *before* its first noisy step (write-
ahead), so a site killed mid-round still counts the steps it may have taken.
Each file carries a SHA-256 of its content, and a ``.trained`` marker beside it
records that the site has trained in this federation: a missing or corrupt ledger
of a site that has trained before is a :class:`LedgerError` with the fix, never a
silent restart at epsilon 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimg.errors import LedgerError
from fedimg.privacy.accounting import PrivacyLedger, epsilon, merged_history

FORMAT = 1
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")

History = list[tuple[float, float, int]]


@dataclass(frozen=True)
class LifetimeBudget:
    """What a site may spend in one federation, over every run: (epsilon, delta)."""

    epsilon: float
    delta: float


def _slug(text: str) -> str:
    """A file-name-safe form of ``text`` that stays distinct (a short hash is appended)."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{_SAFE.sub('_', text)[:60]}-{digest}"


def ledger_path(state_dir: Path, *, federation: str, site: str) -> Path:
    """Where site ``site`` keeps its ledger of ``federation``."""
    return Path(state_dir) / "privacy" / _slug(federation) / f"{_slug(site)}.json"


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _durable_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, fsynced, the folder entry fsynced too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@dataclass
class SiteLedger:
    """One site's ledger of one federation: its runs' ledgers, on disk."""

    path: Path
    federation: str
    site: str
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def marker(self) -> Path:
        """The file that says this site has trained in this federation."""
        return self.path.with_suffix(".trained")

    @classmethod
    def open(cls, state_dir: Path, *, federation: str, site: str) -> SiteLedger:
        """The site's ledger; empty if it never trained; LedgerError if missing or corrupt."""
        path = ledger_path(state_dir, federation=federation, site=site)
        book = cls(path=path, federation=federation, site=site)
        if not path.exists():
            if book.marker.exists():
                raise LedgerError(
                    f"site {site}: its privacy ledger {path} is missing, but {book.marker} "
                    "says it has trained in this federation; refusing to train (epsilon "
                    "would restart at 0). Fix: restore the file from the site's backup, "
                    "or, if the spend is known to be lost, retire this state_dir")
            return book
        book.runs = _read(path, site=site)
        return book

    def run(self, run_key: str) -> dict[str, Any] | None:
        """The ledger of run ``run_key`` as the site recorded it, or None."""
        return self.runs.get(run_key)

    def lifetime_spent(self, budget: LifetimeBudget, *, accountant: str,
                       run_key: str | None = None, history: History | None = None) -> float:
        """Epsilon at the lifetime delta of every run's history.

        With ``run_key`` and ``history``, that run counts as ``history`` (e.g. the
        ledger as it will be after the next round) instead of what is on record.
        """
        runs = {k: [tuple(h) for h in v.get("history", [])] for k, v in self.runs.items()}
        if run_key is not None:
            runs[run_key] = [tuple(h) for h in history or []]
        return epsilon([h for hist in runs.values() for h in hist], budget.delta, accountant)

    def record(self, run_key: str, ledger: dict[str, Any]) -> None:
        """Store ``ledger`` as run ``run_key``'s, durably; refuse to lower the record."""
        own = self.runs.get(run_key)
        if own is not None and not extends(ledger, own):
            raise LedgerError(f"site {self.site}: refusing to record a ledger for this run "
                              "that spends less than the site has on record")
        if not self.marker.exists():
            _durable_write(self.marker, "trained\n")
        self.runs[run_key] = ledger
        body = {"format": FORMAT, "federation": self.federation, "site": self.site,
                "runs": self.runs}
        _durable_write(self.path, json.dumps({**body, "sha256": _digest(body)}, indent=1))


def _read(path: Path, *, site: str) -> dict[str, dict[str, Any]]:
    """The runs of a ledger file; LedgerError naming the file if it is not intact."""
    fix = ("Fix: restore the file from the site's backup; never delete it to start "
           "again (the spend it records is real)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        body = {k: raw[k] for k in ("format", "federation", "site", "runs")}
        intact = raw.get("sha256") == _digest(body) and body["format"] == FORMAT
        runs = body["runs"]
        if intact:
            for ledger in runs.values():
                PrivacyLedger.from_dict(ledger)  # every field present and typed
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"site {site}: its privacy ledger {path} cannot be read "
                          f"({type(exc).__name__}); refusing to train. {fix}") from None
    if not intact:
        raise LedgerError(f"site {site}: its privacy ledger {path} is corrupt (checksum "
                          f"mismatch); refusing to train. {fix}")
    return runs


def extends(ledger: dict[str, Any], own: dict[str, Any]) -> bool:
    """True if ``ledger`` records at least what ``own`` does, with the same calibration.

    Histories are compared merged (Opacus merges consecutive equal (sigma, q) steps),
    so a longer history that starts with the site's own is accepted; a shorter one,
    another sigma or budget, is not.
    """
    keys = ("target_epsilon", "delta", "sample_rate", "accountant")
    if any(ledger.get(k) != own.get(k) for k in keys):
        return False
    if not math.isclose(float(ledger["noise_multiplier"]), float(own["noise_multiplier"]),
                        rel_tol=1e-9):
        return False
    mine = merged_history(own.get("history", []))
    theirs = merged_history(ledger.get("history", []))
    if len(theirs) < len(mine) or theirs[:len(mine) - 1] != mine[:-1]:
        return False
    return not mine or (theirs[len(mine) - 1][:2] == mine[-1][:2]
                        and theirs[len(mine) - 1][2] >= mine[-1][2])
