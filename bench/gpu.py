"""GPU benchmark: AMP and channels-last, the feature cache, client vectorisation, fractional GPUs.

Usage (on a machine with a CUDA GPU)::

    FEDIMG_DATA=../shared/data python bench/gpu.py [--only amp,cache,vectorize,fractional]
        [--repeats 3] [--warmup 1] [--ks 4,8,16,32] [--fractions 1.0,0.5,0.25]
        [--rounds 4] [--client 0] [--out DIR]

    python bench/gpu.py --allow-cpu --tiny      # smoke run of every path, on the CPU

Without a CUDA device it refuses (exit code 2), unless ``--allow-cpu``: then every
section runs on the CPU and every table and figure says "CPU smoke run — not a GPU
figure". ``--tiny`` shrinks every section (one step, a few hundred images, no warm-up,
k = 4, 8, one share, two rounds of two clients); add ``--fractions 1.0,0.5`` to also
run two clients at once. On a loaded 2-core CPU the first three sections take about a
minute or two; ``fractional`` as long again or more (Ray starts its worker).

Sections (``--only`` picks some), each measured side by side in this one invocation,
interleaved, best of ``--repeats`` after ``--warmup`` passes, CUDA synchronised:

* ``amp``: one client's local round (``TaskEnvironment.train``; DP-SGD through
  ``privacy.dp_sgd.train_round``) of ``cameras`` (last_k), ``medical`` (full
  fine-tuning) and ``medical_dp`` (DP-SGD, head), feature cache off, in fp32, with AMP
  (``train.amp``) and with AMP plus ``train.channels_last``; ratios fp32 / variant.
* ``cache``: the same round with ``train.feature_cache=off`` and ``=auto`` (cold: the
  cache rebuilt first; warm: served from it), ``cameras`` and ``medical_dp``.
* ``vectorize``: k = ``--ks`` small camera clients (1-3 batches of 16, 48 px, the
  last_k tail on cached trunk features) trained one by one (``train_sequential``) and
  in one vmapped step per step (``train_vectorized``, fedimg/training/vectorized.py).
* ``fractional``: a real short ``cameras`` simulation (Ray) with
  ``sim.num_gpus_per_client`` in ``--fractions`` (1, 2, 4 clients sharing the GPU),
  CPUs per client fixed; mean wall seconds per round over rounds 2+ (round 1 also
  starts the workers), the ratio to the first share, and peak GPU memory from
  ``nvidia-smi`` (every process: torch's own counters cannot see Ray workers).

Every table's header names the device, torch and CUDA versions and this command;
``--out DIR`` also writes every figure as JSON (``gpu_bench.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_sections import (  # noqa: E402
    SMOKE,
    Context,
    Table,
    amp_section,
    cache_section,
    fractional_section,
    vectorize_section,
)

from fedimg.reporting import setup_logging  # noqa: E402

log = logging.getLogger("fedimg.bench")
SECTIONS: dict[str, Callable[[Context], list[Table]]] = {
    "amp": amp_section, "cache": cache_section, "vectorize": vectorize_section,
    "fractional": fractional_section}
NO_GPU = ("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False), so there is "
          "no GPU figure to measure; run it on a GPU machine, or pass --allow-cpu for a CPU "
          "smoke run whose figures are not GPU figures\n")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without a GPU, run on the CPU (smoke run, not GPU figures)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3, --tiny 1")
    parser.add_argument("--warmup", type=int, default=None, help="default 1, --tiny 0")
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--ks", default=None, help="default 4,8,16,32, --tiny 4,8")
    parser.add_argument("--fractions", default=None,
                        help="sim.num_gpus_per_client values; default 1.0,0.5,0.25, --tiny 1.0")
    parser.add_argument("--rounds", type=int, default=None, help="default 4, --tiny 2")
    parser.add_argument("--out", type=Path, default=None, help="write gpu_bench.json here")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--only {args.only}: unknown {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    if not torch.cuda.is_available() and not args.allow_cpu:
        parser.exit(2, NO_GPU)
    return args


def context(args: argparse.Namespace) -> Context:
    gpu = torch.cuda.is_available()
    return Context(
        device=torch.device("cuda" if gpu else "cpu"), smoke=not gpu, tiny=args.tiny,
        repeats=args.repeats or (1 if args.tiny else 3),
        warmup=(0 if args.tiny else 1) if args.warmup is None else args.warmup,
        client=args.client,
        ks=tuple(int(k) for k in (args.ks or ("4,8" if args.tiny else "4,8,16,32")).split(",")),
        fractions=tuple(float(f) for f in (args.fractions or (
            "1.0" if args.tiny else "1.0,0.5,0.25")).split(",")),
        rounds=args.rounds or (2 if args.tiny else 4))


def environment_facts(ctx: Context) -> dict[str, object]:
    """The device and versions every figure was measured with, and the command."""
    name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}) — {SMOKE}"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if ctx.device.type == "cuda" else None,
            "command": shlex.join(["python", *sys.argv]), "cpu_smoke": ctx.smoke,
            "tiny": ctx.tiny, "repeats": ctx.repeats, "warmup": ctx.warmup,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "n/a" if value is None else str(value)


def render(table: Table, facts: dict[str, object], *, smoke: bool) -> str:
    """A markdown table under a header naming the device, versions and command."""
    columns = [*table.columns, *(["label"] if smoke else [])]
    rows = [[*map(_cell, row), *([SMOKE] if smoke else [])] for row in table.rows]
    lines = [f"### {table.title}" + (f" — {SMOKE}" if smoke else ""),
             f"device: {facts['device']} | torch {facts['torch']}, CUDA {facts['cuda']}, "
             f"cuDNN {facts['cudnn']} | best of {facts['repeats']} after {facts['warmup']} "
             f"warm-up | command: {facts['command']}",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
             *("| " + " | ".join(row) + " |" for row in rows),
             *(f"note: {note}" for note in table.notes)]
    if not rows:
        lines.append("(no rows)")
    return "\n".join(lines)


def write_json(out: Path, facts: dict[str, object], tables: list[Table]) -> Path:
    """Every figure with the device it was measured on, for BENCHMARKS.md."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_bench.json"
    payload_label = SMOKE if facts["cpu_smoke"] else "GPU"
    payload = {**facts, "label": payload_label,
               "tables": [{"section": t.section, "title": t.title, "notes": t.notes,
                           "rows": [{**dict(zip(t.columns, row)), "label": payload_label}
                                    for row in t.rows]}
                          for t in tables]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def main(argv: list[str]) -> None:
    args = parse(argv)
    setup_logging()
    ctx = context(args)
    facts = environment_facts(ctx)
    if ctx.smoke:
        log.warning("%s: no CUDA device; every figure below is a CPU figure", SMOKE)
    tables: list[Table] = []
    for name in args.only.split(","):
        began = time.perf_counter()
        for table in SECTIONS[name](ctx):
            tables.append(table)
            log.info("section %s (%.0fs)\n%s", name, time.perf_counter() - began,
                     render(table, facts, smoke=ctx.smoke))
    log.info("all sections\n%s", "\n\n".join(render(t, facts, smoke=ctx.smoke) for t in tables))
    if args.out is not None:
        log.info("figures written to %s", write_json(args.out, facts, tables))


if __name__ == "__main__":
    main(sys.argv[1:])
