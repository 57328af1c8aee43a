"""fedimg against a textbook Flower simulation of the same workload, as wall-time ratios.

Usage (any scenario overrides may follow; ``--fresh-decode`` and ``--elision`` are
optional)::

    FEDIMG_DATA=../shared/data python bench/flower_baseline.py scenario=cameras rounds=5

``--elision`` also runs fedimg with ``fl.elide_frozen=false`` (every array in every
message, as before :mod:`fedimg.transport.elision`), first, and reports both.

It runs, one after the other in one invocation:

1. **fedimg**: the real simulation (:func:`fedimg.simulation.engine.simulate`), whose workers
   decode the data and build the model once per process.
2. **textbook**: Flower's quickstart-pytorch pattern (``bench/_textbook_app.py``): on
   every train/evaluate message the ClientApp loads the dataset and builds this
   client's partition from scratch, builds a fresh network, loads the received
   arrays, trains or evaluates, and replies; the ServerApp is stock ``FedAvg`` run
   by ``strategy.start``. ``load_dataset`` reads fedimg's on-disk decode cache
   when one exists (a lower bound on the textbook's cost); ``--fresh-decode`` makes
   each call decode the image files again.

Both run the same config, model, partitions and local steps (same loaders, seeds,
threads, learning rates), the same sampling fractions and the same Ray settings
(:func:`fedimg.simulation.engine.start_ray`). What the textbook does not do is switched off
on both sides: central evaluation, checkpoints, plots, progress bars, simulated
device heterogeneity (``hetero.*``) and personalization. Client sampling is random
on both sides, so the two runs train different clients; the final federated
validation accuracies show that the workloads match, not equal digits.

Logged per side: start-up (before round 1), the rounds' wall time, seconds per round
(round 1, and rounds 2+ once every worker is warm), end to end, the time inside
``train_local`` and the final federated validation accuracy; then the textbook's
summed per-call rebuild costs and the ratios textbook / fedimg.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._textbook_app import client_app, textbook_server  # noqa: E402
from fedimg.config.compose import split_argv  # noqa: E402
from fedimg.resolve import compose_and_check  # noqa: E402
from fedimg.config import FedimgConfig  # noqa: E402
from fedimg.simulation.engine import backend_config, simulate, start_ray  # noqa: E402
from fedimg.errors import ConfigError  # noqa: E402
from fedimg.build import prepare_run  # noqa: E402
from fedimg.reporting import setup_logging  # noqa: E402

log = logging.getLogger("fedimg.bench")

FRESH_FLAG = "--fresh-decode"
ELISION_FLAG = "--elision"
# Off on both sides: what the textbook does not do, or what changes the work done.
NEUTRAL = {"output.checkpoints": "false", "output.plots": "false",
           "output.progress": "false", "fl.central_eval": "false",
           "fl.personalize_steps": "0", "hetero.availability": "1.0",
           "hetero.dropout": "0.0", "hetero.speed_sigma": "0.0",
           "hetero.speed_factors": "null", "hetero.uplink_mbps": "null",
           "hetero.downlink_mbps": "null", "hetero.deadline_s": "null"}


@dataclasses.dataclass
class Side:
    """Wall times (s) and outcome of one side."""

    total_s: float
    startup_s: float
    rounds: list[float]
    val_accuracy: float
    train_calls: int
    train_local_s: list[float]  # per round, summed over its clients


def run_fedimg(cfg: FedimgConfig) -> tuple[Side, FedimgConfig, int]:
    """fedimg's own simulation; also the config its clients got, and the class count."""
    started = time.perf_counter()
    prepared = prepare_run(cfg)
    prepare_s = time.perf_counter() - started
    results = simulate(prepared)
    total = time.perf_counter() - started
    trained = [r for r in prepared.recorder.read_rounds() if r["round"] > 0]
    entries = [[c["train"] for c in r["clients"].values() if "train" in c] for r in trained]
    side = Side(total, prepare_s + results["timing"]["startup_s"],
                [r["wall_s"] for r in trained], results["final"].get("val/accuracy", math.nan),
                sum(map(len, entries)),
                [sum(e.get("train/seconds", 0.0) for e in es) for es in entries])
    return side, prepared.client_cfg, prepared.dataset.num_classes


def run_textbook(cfg: FedimgConfig, *, num_classes: int, fresh_decode: bool
                 ) -> tuple[Side, dict[str, float]]:
    """The textbook simulation; also returns its per-call costs summed over the run."""
    import ray
    from flwr.simulation import run_simulation

    stamps: dict[int, float] = {}
    results: dict = {}
    started = time.perf_counter()
    start_ray(cfg.sim)  # the same Ray settings as fedimg's (Flower would start it alike)
    server = textbook_server(cfg, num_classes=num_classes, fresh_decode=fresh_decode,
                             stamps=stamps, results=results)
    resources = {"num_cpus": cfg.sim.num_cpus_per_client,
                 "num_gpus": cfg.sim.num_gpus_per_client}
    try:
        run_simulation(server_app=server, client_app=client_app, num_supernodes=cfg.clients,
                       backend_config={"client_resources": resources,
                                       "init_args": backend_config(cfg.sim)["init_args"]})
    finally:
        if ray.is_initialized():
            ray.shutdown()
    total = time.perf_counter() - started
    if "result" not in results or len(stamps) != cfg.rounds + 1:
        raise RuntimeError("the textbook simulation did not finish; see Flower's log above")
    result = results["result"]
    sums: dict[str, float] = {}
    for record in [*result.train_metrics_clientapp.values(),
                   *result.evaluate_metrics_clientapp.values()]:
        for key in (k for k in record if k.startswith("bench/")):
            sums[key] = sums.get(key, 0.0) + float(record[key])
    train = [result.train_metrics_clientapp[r] for r in range(1, cfg.rounds + 1)]
    side = Side(total, stamps[0] - started,
                [stamps[r] - stamps[r - 1] for r in range(1, cfg.rounds + 1)],
                float(result.evaluate_metrics_clientapp[cfg.rounds]["val/accuracy"]),
                int(sum(float(m["bench/calls"]) for m in train)),
                [float(m["train/seconds"]) for m in train])
    return side, sums


def check_supported(cfg: FedimgConfig) -> None:
    """The textbook client implements plain FedAvg only; refuse anything else up front."""
    extras = {"strategy": cfg.strategy != "fedavg", "privacy.mode": cfg.privacy.mode != "none",
              "compression.kind": cfg.compression.kind != "none",
              "attack.byzantine_fraction": cfg.attack.byzantine_fraction > 0,
              "faults": bool(cfg.faults.raise_at or cfg.faults.kill_at),
              "fl.local_bn": cfg.fl.local_bn, "deploy.enabled": cfg.deploy.enabled}
    bad = [key for key, on in extras.items() if on]
    if bad:
        raise ConfigError(f"the textbook baseline runs plain FedAvg only, but {bad} are set; "
                          "fix: drop those overrides (strategy=fedavg, privacy.mode=none, "
                          "compression.kind=none, ...)")


def _neutral_overrides() -> list[str]:
    """The NEUTRAL overrides for the fields this version of the schema has."""
    default = FedimgConfig()
    return [f"{k}={v}" for k, v in NEUTRAL.items()
            if hasattr(getattr(default, k.split(".")[0], None), k.split(".")[1])]


def _report(cfg: FedimgConfig, feds: dict[str, Side], book: Side, sums: dict[str, float],
            fresh: bool) -> None:
    def steady(values: list[float]) -> float:  # mean over rounds 2+ (round 1 if alone)
        return sum(values[1:] or values) / len(values[1:] or values)

    def line(name: str, s: Side) -> str:
        return (f"{name} start-up {s.startup_s:6.1f}s | rounds {sum(s.rounds):7.1f}s = "
                f"{sum(s.rounds) / len(s.rounds):6.2f} s/round (round 1 {s.rounds[0]:.2f}s, "
                f"2+ {steady(s.rounds):.2f}s) | end to end {s.total_s:7.1f}s | "
                f"{s.train_calls} trainings, train_local {sum(s.train_local_s):.1f}s "
                f"(2+ {steady(s.train_local_s):.2f}s/round) | final federated val "
                f"accuracy {s.val_accuracy:.4f}")

    lines = [
        (f"scenario={cfg.name} model={cfg.model} clients={cfg.clients} rounds={cfg.rounds} "
        f"fraction_train={cfg.fl.fraction_train} fraction_evaluate={cfg.fl.fraction_evaluate}"
        f" image_size={cfg.data.image_size} cpus/client={cfg.sim.num_cpus_per_client} "
        f"decode={'fresh every call' if fresh else 'fedimg decode cache'}"),
        *(line(f"fedimg{name}:", fed) for name, fed in feds.items()),
        line("textbook:", book),
        f"textbook, summed over its {sums.pop('bench/calls', 0):.0f} handler calls: "
        + ", ".join(f"{k.removeprefix('bench/')} {v:.1f}" for k, v in sorted(sums.items()))]
    for name, fed in feds.items():
        lines += [
            f"ratio textbook / fedimg{name}, all rounds        = "
            f"{sum(book.rounds) / sum(fed.rounds):.3f}",
            f"ratio textbook / fedimg{name}, rounds 2+ (warm)  = "
            f"{steady(book.rounds) / steady(fed.rounds):.3f}",
            f"ratio textbook / fedimg{name}, end to end        = "
            f"{book.total_s / fed.total_s:.3f}"]
    log.info("textbook Flower baseline\n%s", "\n".join(lines))


def main(argv: list[str]) -> None:
    setup_logging()
    fresh, elision = FRESH_FLAG in argv, ELISION_FLAG in argv
    scenario, overrides = split_argv([a for a in argv if a not in (FRESH_FLAG, ELISION_FLAG)])
    variants = {" (every array)": ["fl.elide_frozen=false"], "": []} if elision else {"": []}
    feds: dict[str, Side] = {}
    for name, extra in variants.items():
        run_dir = Path(tempfile.mkdtemp(prefix="fedimg-bench-"))
        cfg = compose_and_check(scenario, [*overrides, *extra, *_neutral_overrides(),
                                        f"hydra.run.dir={run_dir}"])
        check_supported(cfg)
        feds[name], client_cfg, num_classes = run_fedimg(cfg)
    book, sums = run_textbook(client_cfg, num_classes=num_classes, fresh_decode=fresh)
    _report(cfg, feds, book, sums, fresh)


if __name__ == "__main__":
    main(sys.argv[1:])
