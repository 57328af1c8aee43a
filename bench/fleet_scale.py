"""A camera fleet at scale: one run, with its accuracy, fairness, participation and peak memory.

Usage (any scenario overrides may follow)::

    FEDIMG_DATA=../shared/data python bench/fleet_scale.py scenario=cameras clients=200 rounds=20

It runs the real simulation (``fedimg.simulation.engine.simulate``, Ray backend) while sampling
the memory of the whole process tree (driver, Ray's GCS and raylet, the worker
actors; PSS, so shared library pages count once), and prints what the run's
``results.json`` and ``metrics.jsonl`` say: final and best test accuracy, the
fairness figures of the last round (worst, 10th-percentile, spread of client
validation accuracy, also after ``fl.personalize_steps`` local steps), how many
sampled clients were offline, dropped, late or aggregated, bytes and wall time.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import PeakMemory  # noqa: E402

from fedimg.config.compose import split_argv  # noqa: E402

from fedimg.resolve import compose_and_check  # noqa: E402
from fedimg.simulation.engine import simulate  # noqa: E402
from fedimg.build import prepare_run  # noqa: E402
from fedimg.reporting import setup_logging  # noqa: E402

log = logging.getLogger("fedimg.bench")


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: list[str]) -> None:
    setup_logging()
    scenario, overrides = split_argv(argv)
    cfg = compose_and_check(scenario, overrides)
    with PeakMemory() as peak:
        results = simulate(prepare_run(cfg))
    final, best = results["final"], results["best"]
    keys = ("test/accuracy", "val/accuracy", "fair/worst_accuracy", "fair/p10_accuracy",
            "fair/spread_accuracy", "fair/std_accuracy", "val/personal_accuracy",
            "fair/worst_personal_accuracy", "fair/p10_personal_accuracy")
    lines = [f"scenario={cfg.name} clients={cfg.clients} rounds={cfg.rounds} "
             f"fraction_train={cfg.fl.fraction_train} run_dir={results['run_dir']}",
             *(f"final {k} = {_fmt(final.get(k))}" for k in keys),
             f"best round {best.get('round')}: test/accuracy {_fmt(best.get('test/accuracy'))}",
             f"participation over all rounds: {results['participation']}",
             f"bytes: down {results['bytes']['down'] / 1e9:.2f} GB, "
             f"up {results['bytes']['up'] / 1e9:.2f} GB",
             f"engine up -> first message of round 1: "
             f"{_fmt(results['timing'].get('first_message_s'))} s",
             f"wall: start-up {results['timing']['startup_s']:.1f}s, rounds "
             f"{results['timing']['rounds_s']:.1f}s, total {results['timing']['total_s']:.1f}s",
             f"peak memory (PSS of driver + Ray + workers) = {peak.bytes / 2**30:.2f} GiB",
             f"memory over time (GiB, highest of each 10 s): {peak.timeline()}",
             f"at the peak, {peak.at_s:.1f} s after the start:\n{peak.breakdown()}"]
    log.info("fleet scale benchmark\n%s", "\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
