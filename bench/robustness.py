"""Robustness table: final accuracy under Byzantine clients, FedAvg against robust aggregators.

Usage::

    FEDIMG_DATA=../shared/data python bench/robustness.py
        [--fractions 0,0.1,0.3] [--strategies fedavg,fedmedian,fedtrimmedavg,krum,multikrum]
        [--attack sign_flip] [--rounds 6] [--out runs/robustness] [-- key=value ...]

Every cell is one real simulation (Flower + Ray) of the ``medical`` scenario moved to
the blood-cell crops (``bccd_cells``, 3 classes, 1014 training images): 10 clients
with Dirichlet(1.0) label skew, EfficientNet-Lite0 with ImageNet weights fine-tuned
head-only at 64 px, 6 rounds of one local epoch. ``attack.byzantine_fraction`` of the
clients are malicious (the same seeded clients for every strategy) and, with the
default ``sign_flip``, send w_g - 4 (w_i - w_g). Krum and MultiKrum are told f = 3
(the 30% case) in every row, MultiKrum averaging the n - f = 7 best-scored updates; FedTrimmedAvg cuts ``fl.trim_beta`` = 0.2 at each end (its default).
Extra ``key=value`` arguments after ``--`` apply to every run.

It prints, and writes to ``<out>/robustness.md``, the final test accuracy of each
(strategy, fraction) and its drop from the same strategy without attackers. Finished
cells are read back from their run directories, so an interrupted table resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.simulate import run  # noqa: E402

log = logging.getLogger("bench.robustness")

BASE = ["scenario=medical", "data.dataset=bccd_cells", "clients=10", "transfer.mode=head",
        "data.image_size=64", "data.partitioner=dirichlet", "data.alpha=1.0",
        "data.quantity_skew=0", "data.min_partition_size=16", "train.lr=0.01",
        "train.class_weighting=none", "fl.num_malicious=3", "output.plots=false",
        "output.progress=false", "fl.min_train_clients=10", "fl.min_evaluate_clients=10"]


def _cell(out: Path, strategy: str, fraction: float, args: argparse.Namespace) -> dict:
    run_dir = out / f"{strategy}-{fraction:g}"
    results = run_dir / "results.json"
    if not results.is_file():
        run([*BASE, f"rounds={args.rounds}", f"strategy={strategy}",
             f"attack.byzantine_fraction={fraction}", f"attack.kind={args.attack}",
             f"hydra.run.dir={run_dir}", *args.overrides])
    data = json.loads(results.read_text())
    return {"acc": data["final"]["test/accuracy"], "auc": data["final"]["test/auc"],
            "rejected": sum(data["rejected_updates"].values()),
            "source": data["data"]["source"]}


def _table(cells: dict, strategies: list[str], fractions: list[float]) -> str:
    head = "| strategy | " + " | ".join(f"{f:.0%} attackers" for f in fractions) + " |"
    lines = [head, "|---|" + "---|" * len(fractions)]
    for s in strategies:
        clean = cells[s, fractions[0]]["acc"]
        row = [f"{cells[s, f]['acc']:.3f}" + ("" if f == fractions[0]
                                              else f" ({cells[s, f]['acc'] - clean:+.3f})")
               for f in fractions]
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0,0.1,0.3")
    parser.add_argument("--strategies", default="fedavg,fedmedian,fedtrimmedavg,krum,multikrum")
    parser.add_argument("--attack", default="sign_flip")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="runs/robustness")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    strategies = args.strategies.split(",")
    out = Path(args.out)
    cells = {(s, f): _cell(out, s, f, args) for s in strategies for f in fractions}
    if any(c["source"] != "real" for c in cells.values()):
        log.warning("some cells ran on synthetic data: set FEDIMG_DATA=../shared/data")
    table = _table(cells, strategies, fractions)
    (out / "robustness.md").write_text(
        f"Final test accuracy (change vs 0%), attack={args.attack}, bccd_cells, 10 "
        f"clients, {args.rounds} rounds\n\n{table}\n")
    print(table)  # noqa: T201 - the benchmark's output


if __name__ == "__main__":
    main()
