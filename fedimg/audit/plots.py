"""PNG figures of a privacy sweep (:mod:`fedimg.audit.sweep`).

* ``accuracy_vs_epsilon.png``: final test accuracy / balanced accuracy / AUC against
  the target epsilon, mean and spread (one std) across seeds; no-DP at "inf";
* ``mia_vs_epsilon.png``: membership-inference TPR at 1% FPR (loss attack, LiRA)
  against the ceiling that each run's (epsilon, delta) implies;
* ``accuracy_vs_round.png``: test accuracy per round for every epsilon (first seed),
  with the epsilon spent so far on a second axis;
* ``epsilon_per_client.png``: each client's epsilon after every round, per target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedimg.reporting.run_dir import read_jsonl  # noqa: E402
from fedimg.reporting.paths import RunPaths


def _positions(epsilons: list[float]) -> tuple[list[float], list[float], list[str]]:
    """x positions on a log axis; inf sits one octave right of the largest finite value."""
    finite = [e for e in epsilons if math.isfinite(e)] or [1.0]
    inf_x = max(finite) * 2
    xs = [e if math.isfinite(e) else inf_x for e in epsilons]
    ticks = sorted(set(xs))
    labels = ["no DP" if t == inf_x and any(math.isinf(e) for e in epsilons) else f"{t:g}"
              for t in ticks]
    return xs, ticks, labels


def _epsilon_axis(ax: Any, epsilons: list[float]) -> list[float]:
    xs, ticks, labels = _positions(epsilons)
    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)
    ax.minorticks_off()
    ax.set_xlabel("target epsilon")
    return xs


def _accuracy_vs_epsilon(summary: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = _epsilon_axis(ax, [s["target_epsilon"] for s in summary])
    for key, label in (("test/accuracy", "accuracy"), ("test/balanced_accuracy",
                                                        "balanced accuracy"), ("test/auc", "AUC")):
        ys = [s.get(key) for s in summary]
        if any(y is not None for y in ys):
            ax.errorbar(xs, [y if y is not None else math.nan for y in ys],
                        yerr=[s.get(f"{key}_std") or 0.0 for s in summary], marker="o",
                        capsize=3, label=label)
    ax.set_ylabel("final test metric (mean +- std over seeds)")
    ax.set_title("privacy / utility")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _mia_vs_epsilon(summary: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = _epsilon_axis(ax, [s["target_epsilon"] for s in summary])
    for key, label, style in (("mia_loss_tpr@1%", "loss attack", "o-"),
                              ("lira_tpr@1%", "LiRA", "s-"),
                              ("bound_tpr@1%", "DP bound", "k--")):
        pts = [(x, s[key]) for x, s in zip(xs, summary) if s.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.axhline(0.01, color="grey", lw=0.8, ls=":", label="chance (TPR = FPR)")
    ax.set_yscale("log")
    ax.set_ylabel("TPR at 1% FPR")
    ax.set_title("membership inference vs the (epsilon, delta) bound")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _spent(record: dict[str, Any]) -> float:
    """Epsilon spent after a round: the server's (client-level) or the largest client's."""
    if "dp/epsilon" in record:
        return float(record["dp/epsilon"])
    values = [c.get("train", {}).get("dp/epsilon") for c in record.get("clients", {}).values()]
    values = [v for v in values if v is not None]
    return max(values) if values else math.nan


def _first_seed_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = min(r["seed"] for r in rows)
    return sorted((r for r in rows if r["seed"] == first), key=lambda r: r["target_epsilon"])


def _accuracy_vs_round(rows: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax_eps = ax.twinx()
    for i, row in enumerate(_first_seed_runs(rows)):
        rounds = read_jsonl(RunPaths(row["run_dir"]).metrics)
        label = "no DP" if math.isinf(row["target_epsilon"]) else f"eps={row['target_epsilon']:g}"
        color = f"C{i}"
        ax.plot([r["round"] for r in rounds], [r.get("test/accuracy") for r in rounds],
                "o-", color=color, label=label)
        spent = [(r["round"], _spent(r)) for r in rounds if r["round"] > 0]
        if spent and not math.isinf(row["target_epsilon"]):
            ax_eps.plot(*zip(*spent), "--", color=color, alpha=0.7)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (solid)")
    ax_eps.set_ylabel("epsilon spent (dashed)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("accuracy and privacy spent per round")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _epsilon_per_client(rows: list[dict[str, Any]], out: Path) -> None:
    private = [r for r in _first_seed_runs(rows) if math.isfinite(r["target_epsilon"])]
    if not private:
        return
    fig, axes = plt.subplots(1, len(private), figsize=(3.2 * len(private), 3.2), sharey=False,
                             squeeze=False)
    for ax, row in zip(axes[0], private):
        rounds = [r for r in read_jsonl(RunPaths(row["run_dir"]).metrics) if r["round"]]
        clients = sorted({c for r in rounds for c in r.get("clients", {})}, key=int)
        for c in clients:
            pts = [(r["round"], r["clients"][c]["train"]["dp/epsilon"]) for r in rounds
                   if "dp/epsilon" in r.get("clients", {}).get(c, {}).get("train", {})]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=f"client {c}")
        ax.axhline(row["target_epsilon"], color="k", ls="--", lw=0.8)
        ax.set_title(f"target eps={row['target_epsilon']:g}", fontsize=9)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("epsilon spent")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_sweep(root: Path, rows: list[dict[str, Any]],
               summary: list[dict[str, Any]]) -> list[Path]:
    """Draw every sweep figure into ``root/plots`` (``summary``: per-epsilon means)."""
    plots = RunPaths(root).plots
    plots.mkdir(parents=True, exist_ok=True)
    _accuracy_vs_epsilon(summary, plots / "accuracy_vs_epsilon.png")
    _mia_vs_epsilon(summary, plots / "mia_vs_epsilon.png")
    _accuracy_vs_round(rows, plots / "accuracy_vs_round.png")
    _epsilon_per_client(rows, plots / "epsilon_per_client.png")
    return sorted(plots.glob("*.png"))
