"""Update compression: final accuracy and uplink bytes against uncompressed updates.

Usage::

    FEDIMG_DATA=../shared/data python bench/compression.py
        [--scenario bccd|cameras] [--kinds none,fp16,int8,topk,topk-noef] [--rounds 6]
        [--out runs/compression] [-- key=value ...]

``--scenario cameras`` runs the ``cameras`` scenario as it is (50 unreliable cameras
on GTSRB, with its uplink bandwidth and round deadline), where smaller updates also
mean fewer stragglers: the table then counts the updates aggregated and lost.

Every cell is one real simulation (Flower + Ray) on the blood-cell crops
(``bccd_cells``, 3 classes): 10 clients with Dirichlet(1.0) label skew,
EfficientNet-Lite0 with ImageNet weights, its last 2 blocks and head fine-tuned at
64 px (frozen weights are never sent), 6 rounds of one local epoch. ``topk`` sends 1%
of each trained tensor with error feedback, ``topk-noef`` the same without it.

It prints, and writes to ``<out>/compression.md``, the final test accuracy, the
uplink megabytes over the run and their ratio to uncompressed updates, measured
side by side in one invocation. Finished cells are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.simulate import run  # noqa: E402

BASE = ["scenario=medical", "data.dataset=bccd_cells", "clients=10", "transfer.mode=last_k",
        "transfer.last_k=2", "data.image_size=64", "data.partitioner=dirichlet",
        "data.alpha=1.0", "data.quantity_skew=0", "data.min_partition_size=16",
        "train.lr=0.01", "train.class_weighting=none", "output.plots=false",
        "output.progress=false"]
CAMERAS = ["scenario=cameras", "output.plots=false", "output.progress=false"]
KINDS = {"none": ["compression.kind=none"], "fp16": ["compression.kind=fp16"],
         "int8": ["compression.kind=int8"],
         "topk": ["compression.kind=topk", "compression.topk_fraction=0.01"],
         "topk-noef": ["compression.kind=topk", "compression.topk_fraction=0.01",
                       "compression.error_feedback=false"]}


def _cell(out: Path, kind: str, args: argparse.Namespace) -> dict:
    run_dir = out / kind
    if not (run_dir / "results.json").is_file():
        base = CAMERAS if args.scenario == "cameras" else BASE
        run([*base, f"rounds={args.rounds}", *KINDS[kind], f"hydra.run.dir={run_dir}",
             *args.overrides])
    results = json.loads((run_dir / "results.json").read_text())
    part = results.get("participation", {})
    return {"acc": results["final"]["test/accuracy"], "up": results["bytes"]["up"],
            "ok": part.get("ok", 0), "late": part.get("straggler", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("bccd", "cameras"), default="bccd")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="runs/compression")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    cells = {k: _cell(out, k, args) for k in args.kinds.split(",")}
    base = cells.get("none", next(iter(cells.values())))
    lines = ["| updates | final test acc | uplink MB | **bytes / uncompressed** | "
             "updates aggregated | stragglers |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {c['acc']:.3f} | {c['up'] / 1e6:.1f} | **{c['up'] / base['up']:.3f}** "
              f"| {c['ok']} | {c['late']} |" for k, c in cells.items()]
    table = "\n".join(lines)
    (out / "compression.md").write_text(table + "\n")
    print(table)  # noqa: T201 - the benchmark's output


if __name__ == "__main__":
    main()
