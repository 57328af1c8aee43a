"""Where each file of a run directory lives: one place names them all.

Layout of ``<run_dir>``::

    config.yaml        resolved config (also config.json), seed and library versions
    partitions.npz     client index lists; partitions.json: label counts per client
    sites.json         a deployment's sites, as they reported themselves
    metrics.jsonl      one JSON object per round (round 0 = the initial model)
    results.json       final and best metrics, data provenance, timings, versions
    checkpoints/       final.pt and best.pt (state dict + metadata), last.pt (resume
                       state), ledgers.json (DP-SGD ledgers as the clients reported them)
    plots/             PNG figures drawn from the files above
    export/            edge models (``python -m fedimg.export``)
    run.log            the full log, Flower's included
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    config_yaml = property(lambda self: self.root / "config.yaml")
    config_json = property(lambda self: self.root / "config.json")
    partitions = property(lambda self: self.root / "partitions.npz")
    partitions_json = property(lambda self: self.root / "partitions.json")
    sites = property(lambda self: self.root / "sites.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    results = property(lambda self: self.root / "results.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    ledgers = property(lambda self: self.root / "checkpoints" / "ledgers.json")
    plots = property(lambda self: self.root / "plots")
    export = property(lambda self: self.root / "export")
    log = property(lambda self: self.root / "run.log")

    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>.pt`` (``final``, ``best``, ``last``)."""
        return self.checkpoints / f"{name}.pt"
