"""Secure aggregation's cost and distributed DP's utility, side by side in one invocation.

Usage::

    FEDIMG_DATA=../shared/data python bench/secure_aggregation.py overhead [only=5_hospitals]
    FEDIMG_DATA=../shared/data python bench/secure_aggregation.py dp [rounds=20]

``overhead`` runs each workload twice with the same seed, plain FedAvg and
``fl.secure_aggregation=secaggplus`` (5 hospitals: ``scenario=medical``; 50 and 200
cameras: ``scenario=cameras``, 20% and 10% sampled), and prints the mean round time
(rounds after the first: the first pays the workers' start), the bytes of a round
(every exchange, down and up, and the key stages), their ratios, and SecAgg+'s seconds
per stage. ``dp`` runs 50 cameras (20% a round, no simulated dropouts, as client_dp
needs every reply) under ``privacy=client_dp`` and ``privacy=distributed_dp`` at the
same target epsilon, and prints epsilon, accuracy and round time. Each run is a real
``python -m fedimg.simulate`` in its own process; its run directory is kept under
``bench_runs/secure_aggregation/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench_runs" / "secure_aggregation"
QUIET = ["output.plots=false", "output.progress=false", "output.tensorboard=false"]
SECURE = "fl.secure_aggregation=secaggplus"
WORKLOADS = {
    "5 hospitals": ["scenario=medical"],
    "50 cameras": ["scenario=cameras"],
    "200 cameras": ["scenario=cameras", "clients=200", "fl.fraction_train=0.1",
                    "fl.fraction_evaluate=0.1"],
}
STAGES = ("setup", "share_keys", "collect", "unmask")


def simulate(name: str, argv: list[str]) -> tuple[list[dict], float]:
    """Run one simulation; its metrics.jsonl records and wall seconds."""
    run_dir = OUT / name
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedimg.simulate", *argv, *QUIET,
                    f"hydra.run.dir={run_dir}"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines], wall


def _round_bytes(record: dict) -> float:
    extra = sum(record.get(f"secagg/{s}_bytes", 0.0) for s in ("setup", "share_keys", "unmask"))
    return record.get("bytes/down", 0.0) + record.get("bytes/up", 0.0) + extra


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def overhead(extra: list[str]) -> None:
    only = [a.split("=", 1)[1] for a in extra if a.startswith("only=")]  # e.g. only=50_cameras
    extra = [a for a in extra if not a.startswith("only=")]
    print("| workload | FedAvg s/round | SecAgg+ s/round | ratio | FedAvg MB/round | "
          "SecAgg+ MB/round | ratio | SecAgg+ s per stage (setup, share, collect, unmask) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, argv in WORKLOADS.items():
        slug = label.replace(" ", "_")
        if only and slug not in only:
            continue
        plain, _ = simulate(f"{slug}_fedavg", [*argv, "rounds=3", *extra])
        secure, _ = simulate(f"{slug}_secagg", [*argv, "rounds=3", SECURE, *extra])
        rows = [[r for r in records[2:] if "wall_s" in r] for records in (plain, secure)]
        t = [_mean([r["wall_s"] for r in rs]) for rs in rows]
        b = [_mean([_round_bytes(r) for r in rs]) / 1e6 for rs in rows]
        stages = ", ".join(f"{_mean([r[f'secagg/{s}_s'] for r in rows[1] if f'secagg/{s}_s' in r]):.2f}"
                           for s in STAGES)
        print(f"| {label} | {t[0]:.2f} | {t[1]:.2f} | {t[1] / t[0]:.2f}x | {b[0]:.1f} | "
              f"{b[1]:.1f} | {b[1] / b[0]:.2f}x | {stages} |", flush=True)


def dp(extra: list[str]) -> None:
    base = ["scenario=cameras", "hetero.availability=1.0", "hetero.dropout=0.0",
            "hetero.deadline_s=null",
            "privacy.target_epsilon=8", *extra]
    print("| privacy | epsilon (rdp) | final test acc | best test acc | s/round | run wall s |")
    print("|---|---|---|---|---|---|")
    for mode in ("client_dp", "distributed_dp"):
        records, wall = simulate(f"cameras_{mode}", [*base, f"privacy={mode}"])
        last = [r for r in records if "dp/epsilon" in r][-1]
        best = max(r.get("test/accuracy", 0.0) for r in records[1:])
        per_round = _mean([r["wall_s"] for r in records[2:] if "wall_s" in r])
        print(f"| {mode} | {last['dp/epsilon']:.3f} | {records[-1].get('test/accuracy'):.4f} | "
              f"{best:.4f} | {per_round:.2f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    what, rest = (sys.argv[1] if len(sys.argv) > 1 else "overhead"), sys.argv[2:]
    {"overhead": overhead, "dp": dp}[what](rest)
