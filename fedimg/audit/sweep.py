"""Privacy/utility sweeps: one federated run per (epsilon, seed), audited and tabulated.

``python -m fedimg.audit scenario=medical_dp sweep.epsilons=[0.5,1,2,4,8,inf]
sweep.seeds=[0,1]`` runs the scenario once per grid point with ``privacy=dp_sgd``
(or ``sweep.mode=client_dp``) at that target epsilon; ``inf`` is the same pipeline
without DP (frozen BatchNorm kept, so the comparison isolates clipping and noise);
``sweep.nonprivate=[train.lr=0.05]`` gives that point its own settings, e.g. the
smaller learning rate that unclipped gradients need.
Every point is a normal run directory under the sweep directory, and a point whose
``results.json`` exists is reused, so an interrupted sweep resumes where it stopped.
Each final model gets a membership-inference audit; LiRA with shadow models runs
for ``sweep.lira_epsilons`` only (it trains ``sweep.lira_shadows`` models each).
The sweep writes ``sweep.csv``/``sweep.md`` (every run, and mean +- std over seeds)
and plots (:mod:`fedimg.audit.plots`).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedimg.errors import ConfigError
from fedimg.reporting.paths import RunPaths
from fedimg.reporting.tables import markdown, parse_value, sample_std, write_csv

log = logging.getLogger(__name__)

PREFIX = "sweep."
COLUMNS = ("target_epsilon", "seed", "epsilon", "delta", "test/accuracy",
           "test/balanced_accuracy", "test/auc", "mia_loss_auc", "mia_loss_tpr@1%",
           "lira_auc", "lira_tpr@0.1%", "lira_tpr@1%", "bound_tpr@1%", "clients_stopped",
           "rounds_s")


@dataclass
class SweepConfig:
    """The grid and the audits of a sweep (``sweep.*`` arguments)."""

    epsilons: list[float] = field(default_factory=lambda: [0.5, 1, 2, 4, 8, math.inf])
    seeds: list[int] = field(default_factory=lambda: [0])
    mode: str = "dp_sgd"  # dp_sgd | client_dp
    dir: str = ""  # default runs/privacy-sweep/<scenario>-<time>
    audit_pool: int = 500  # members (and as many non-members) per membership audit
    lira_shadows: int = 0  # shadow models per LiRA audit; 0 = loss attack only
    lira_epsilons: list[float] = field(default_factory=lambda: [math.inf, 1.0])
    inversion_steps: int = 0  # gradient-inversion audit of the first LiRA point; 0 = off
    nonprivate: list[str] = field(default_factory=list)  # extra overrides for epsilon=inf


def parse_args(argv: Sequence[str]) -> tuple[SweepConfig, list[str]]:
    """Split ``sweep.key=value`` arguments from the scenario's own arguments."""
    sweep, rest, names = SweepConfig(), [], {f.name for f in fields(SweepConfig)}
    for arg in argv:
        if not arg.startswith(PREFIX):
            rest.append(arg)
            continue
        key, _, value = arg[len(PREFIX):].partition("=")
        if key not in names:
            raise ConfigError(f"unknown sweep option '{key}'; valid: {', '.join(sorted(names))}")
        setattr(sweep, key, parse_value(value))
    _check(sweep)
    return sweep, rest


def _check(sweep: SweepConfig) -> None:
    sweep.epsilons = [float(e) for e in sweep.epsilons]
    sweep.lira_epsilons = [float(e) for e in sweep.lira_epsilons]
    if isinstance(sweep.nonprivate, str):
        sweep.nonprivate = [sweep.nonprivate]
    if not sweep.epsilons or min(sweep.epsilons) <= 0:
        raise ConfigError(f"sweep.epsilons={sweep.epsilons} needs positive values (inf = no DP)")
    if sweep.mode not in ("dp_sgd", "client_dp"):
        raise ConfigError(f"sweep.mode='{sweep.mode}' is unknown; valid: dp_sgd, client_dp")
    if not sweep.seeds or sweep.lira_shadows < 0 or sweep.audit_pool < 2:
        raise ConfigError("sweep.seeds must be non-empty, sweep.lira_shadows >= 0 and "
                          "sweep.audit_pool >= 2")


def point_args(sweep: SweepConfig, eps: float, seed: int, run_dir: Path) -> list[str]:
    """The simulation arguments of one grid point."""
    privacy = ([f"privacy={sweep.mode}", f"privacy.target_epsilon={eps}"]
               if math.isfinite(eps) else ["privacy=none", "transfer.bn=frozen",
                                           *map(str, sweep.nonprivate)])
    return [*privacy, f"seed={seed}", f"hydra.run.dir={run_dir}"]


def _point_dir(root: Path, eps: float, seed: int) -> Path:
    return root / f"eps-{'inf' if math.isinf(eps) else f'{eps:g}'}_seed-{seed}"


def _row(eps: float, seed: int, run_dir: Path, audit: dict[str, Any]) -> dict[str, Any]:
    results = json.loads(RunPaths(run_dir).results.read_text())
    final, lira = results.get("final", {}), audit.get("lira", {})
    stopped = [c for c, v in results.get("privacy", {}).get("clients", {}).items()
               if v.get("stopped_round") is not None]
    return {"target_epsilon": eps, "seed": seed, "epsilon": audit["epsilon"],
            "delta": audit["delta"], "test/accuracy": final.get("test/accuracy"),
            "test/balanced_accuracy": final.get("test/balanced_accuracy"),
            "test/auc": final.get("test/auc"), "mia_loss_auc": audit["loss"]["auc"],
            "mia_loss_tpr@1%": audit["loss"]["tpr_at_fpr_0.01"],
            "lira_auc": lira.get("auc"), "lira_tpr@0.1%": lira.get("tpr_at_fpr_0.001"),
            "lira_tpr@1%": lira.get("tpr_at_fpr_0.01"),
            "bound_tpr@1%": audit["bound"]["tpr_at_fpr_0.01"],
            "clients_stopped": len(stopped), "rounds_s": results["timing"]["rounds_s"],
            "run_dir": str(run_dir)}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per target epsilon."""
    out = []
    for eps in sorted({r["target_epsilon"] for r in rows}):
        group = [r for r in rows if r["target_epsilon"] == eps]
        entry: dict[str, Any] = {"target_epsilon": eps, "seeds": len(group)}
        for col in COLUMNS[2:]:
            values = [float(r[col]) for r in group if r.get(col) is not None]
            entry[col] = statistics.fmean(values) if values else None
            entry[f"{col}_std"] = sample_std(values)
        out.append(entry)
    return out


def write_tables(root: Path, rows: list[dict[str, Any]]) -> None:
    """sweep.csv (every run), sweep_summary.csv and sweep.md (both tables)."""
    summary = summarise(rows)
    write_csv(root / "sweep.csv", rows)
    write_csv(root / "sweep_summary.csv", summary)
    mean_cols = ["target_epsilon", "seeds", "epsilon", "test/accuracy", "test/accuracy_std",
                 "test/auc", "mia_loss_auc", "mia_loss_tpr@1%", "lira_auc", "lira_tpr@1%",
                 "bound_tpr@1%"]
    (root / "sweep.md").write_text(
        "# Privacy/utility sweep\n\n## Mean over seeds\n\n" + markdown(summary, mean_cols)
        + "\n\n## Every run\n\n" + markdown(rows, COLUMNS) + "\n")


def _audit(run_dir: Path, sweep: SweepConfig, shadows: int, seed: int) -> dict[str, Any]:
    from fedimg.audit.run_audit import audit_run

    path = run_dir / "audit.json"
    if path.is_file():
        audit = json.loads(path.read_text())
        same = (audit.get("pool_size"), audit.get("seed"), audit.get("lira", {}).get(
            "shadows", 0)) == (sweep.audit_pool, seed, shadows)
        if same:
            return audit
    return audit_run(run_dir, pool_size=sweep.audit_pool, shadows=shadows, seed=seed)


def run_sweep(argv: Sequence[str]) -> Path:
    """Run (or resume) the sweep described by ``argv``; return its directory."""
    from fedimg.audit.plots import plot_sweep
    from fedimg.config.compose import split_argv
    from fedimg.grids import check_cells, grid_root, run_cell
    from fedimg.reporting import setup_logging

    setup_logging()
    sweep, rest = parse_args(argv)
    scenario, overrides = split_argv(rest)
    root = grid_root(sweep.dir, kind="privacy-sweep", scenario=scenario)
    points = [(e, s) for e in sweep.epsilons for s in sweep.seeds]
    check_cells(scenario, overrides, [point_args(sweep, e, s, root / "check")
                                      for e, s in points])
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (eps, seed) in enumerate(points, 1):
        run_dir = _point_dir(root, eps, seed)
        log.info("sweep point %d/%d: epsilon=%g seed=%d -> %s", i, len(points), eps, seed,
                 run_dir)
        run_cell(scenario, overrides, point_args(sweep, eps, seed, run_dir), run_dir)
        lira = sweep.lira_shadows if (eps in sweep.lira_epsilons and seed == sweep.seeds[0]) else 0
        rows.append(_row(eps, seed, run_dir, _audit(run_dir, sweep, lira, seed)))
        write_tables(root, rows)
    plot_sweep(root, rows, summarise(rows))
    if sweep.inversion_steps:
        from fedimg.audit.run_audit import inversion_audit

        inversion_audit(_point_dir(root, sweep.lira_epsilons[0], sweep.seeds[0]),
                        steps=sweep.inversion_steps)
    log.info("sweep table\n%s", (root / "sweep.md").read_text())
    return root
