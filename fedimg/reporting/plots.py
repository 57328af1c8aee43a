"""PNG figures of a run, drawn from the files in its run directory.

* ``accuracy_loss.png``: test/val accuracy (and the worst client's val accuracy) and
  train/test loss against round;
* ``client_accuracy.png``: each client's validation accuracy against round;
* ``label_distribution.png``: stacked label counts per client (the partition).

A run on synthetic fallback data says so in every title.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedimg.reporting.run_dir import read_jsonl  # noqa: E402
from fedimg.reporting.paths import RunPaths

log = logging.getLogger(__name__)


def _series(rounds: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs = [r["round"] for r in rounds if r.get(key) is not None]
    return xs, [r[key] for r in rounds if r.get(key) is not None]


def _title(run_dir: Path, text: str) -> str:
    results = RunPaths(run_dir).results
    data = json.loads(results.read_text()).get("data", {}) if results.exists() else {}
    tag = " [SYNTHETIC FALLBACK DATA]" if data.get("source") == "synthetic-fallback" else ""
    return f"{text}: {data.get('dataset', '')}{tag}"


def _accuracy_loss(run_dir: Path, rounds: list[dict[str, Any]], out: Path) -> None:
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("test/accuracy", "test (central)"), ("val/accuracy", "val (federated)"),
                       ("train/accuracy", "train"), ("fair/worst_accuracy", "worst client (val)")):
        ax_acc.plot(*_series(rounds, key), marker="o", label=label)
    for key, label in (("train/loss", "train"), ("test/loss", "test (central)"),
                       ("val/loss", "val (federated)")):
        ax_loss.plot(*_series(rounds, key), marker="o", label=label)
    for ax, name in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(_title(run_dir, "Accuracy and loss per round"))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _client_accuracy(run_dir: Path, rounds: list[dict[str, Any]], out: Path) -> None:
    per_client: dict[str, tuple[list[int], list[float]]] = {}
    for r in rounds:
        for cid, client in (r.get("clients") or {}).items():
            acc = (client.get("val") or {}).get("val/accuracy")
            if acc is not None:
                xs, ys = per_client.setdefault(cid, ([], []))
                xs.append(r["round"])
                ys.append(acc)
    fig, ax = plt.subplots(figsize=(7, 4))
    for cid in sorted(per_client, key=int):
        ax.plot(*per_client[cid], marker=".", label=f"client {cid}")
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy (local split)")
    ax.grid(alpha=0.3)
    if per_client:
        ax.legend(fontsize="small", ncol=2)
    ax.set_title(_title(run_dir, "Accuracy per client"))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_label_distribution(run_dir: Path, out: Path) -> None:
    """Stacked bars of train label counts per client, from ``partitions.json``."""
    info = json.loads((RunPaths(run_dir).partitions_json).read_text())
    counts, classes = info["label_counts"], info["classes"]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(counts) + 3), 4))
    bottom = [0] * len(counts)
    for c, name in enumerate(classes):
        heights = [row[c] for row in counts]
        ax.bar(range(len(counts)), heights, bottom=bottom, label=str(name))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("client")
    ax.set_ylabel("train samples")
    if len(classes) <= 12:
        ax.legend(fontsize="small")
    ax.set_title(_title(run_dir, f"Label distribution ({info.get('partitioner', '')})"))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure that the run's files allow; return the PNG paths."""
    run_dir = Path(run_dir)
    plots = RunPaths(run_dir).plots
    plots.mkdir(exist_ok=True)
    rounds = read_jsonl(RunPaths(run_dir).metrics)
    written = []
    if rounds:
        _accuracy_loss(run_dir, rounds, plots / "accuracy_loss.png")
        _client_accuracy(run_dir, rounds, plots / "client_accuracy.png")
        written += [plots / "accuracy_loss.png", plots / "client_accuracy.png"]
    if (RunPaths(run_dir).partitions_json).exists():
        plot_label_distribution(run_dir, plots / "label_distribution.png")
        written.append(plots / "label_distribution.png")
    log.info("plots written to %s", plots)
    return written
