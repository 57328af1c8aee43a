"""Frozen-trunk feature cache: one client's round with and without it, and the equality check.

Usage::

    FEDIMG_DATA=../shared/data python bench/feature_cache.py [--scenarios medical_dp,cameras]
        [--repeats 3] [--client 0] [--threads 2]

For each scenario (as shipped: real data, pretrained EfficientNet-Lite0, its augmentation),
two task environments are built, ``train.feature_cache=off`` and ``=on``, and one
client's local round is timed the way a client runs it (``medical_dp``: a DP-SGD round
through :func:`fedimg.privacy.dp_sgd.train_round`, head only; ``cameras``:
``TaskEnvironment.train``, last 2 blocks). Before every round the same global weights are
loaded (the pretrained initial model), as a message would bring them. Timed, interleaved
off/on, the best of ``--repeats`` (the CPU is shared: noise only adds time):

* **uncached**: the round as today;
* **cold**: a cached round that first runs the trunk over the bank of K views (the first
  round, or any round after a frozen weight changed);
* **warm**: a later round with the same frozen weights (served from the cache);
* **amortised**: (cold + (n - 1) warm) / n over n participations of the client.

The equality check reruns one round with ``data.augment=none`` (exact cache) and seeded
DP noise, cached against uncached (frozen blocks run without stochastic depth either way:
``fedimg.models.transfer``). Central/federated evaluation: ``evaluate_client`` both ways.

``--simulate R`` instead runs each scenario's real simulation (Ray, every client) for R
rounds with ``train.feature_cache=off`` and then ``=auto``, and reports the mean seconds
of a round (rounds 2..R: every worker is warm), the megabytes moved and the final
metrics of both; ``--elision`` runs each also with ``fl.elide_frozen=false`` (every
array in every message), and the ratios are then against cache off with every array.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.build import initial_model  # noqa: E402
from fedimg.clientapp.environment import TaskEnvironment  # noqa: E402
from fedimg.config.compose import compose_config  # noqa: E402
from fedimg.privacy.dp_sgd import train_round  # noqa: E402

warnings.filterwarnings("ignore")
COMMON = ["output.progress=false", "output.plots=false"]


def _env(scenario: str, cache: str, *extra: str, threads: int) -> TaskEnvironment:
    cfg = compose_config(scenario, [*COMMON, f"train.feature_cache={cache}", *extra])
    return TaskEnvironment(cfg, num_threads=threads)


def _global(env: TaskEnvironment) -> dict[str, torch.Tensor]:
    """The run's first global model (pretrained), as the server sends it."""
    return initial_model(env.cfg, env.num_classes)[0]


def _round(env: TaskEnvironment, client: int, start: dict[str, torch.Tensor],
           server_round: int = 1) -> tuple[float, dict[str, float]]:
    """One local round of ``client`` from ``start``: (seconds, metrics)."""
    env.load_state(start)
    began = time.perf_counter()
    if env.cfg.privacy.mode == "dp_sgd":
        metrics = train_round(env, client, server_round=server_round).metrics
    else:
        metrics, _ = env.train(client, server_round=server_round)
    return time.perf_counter() - began, metrics


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def timings(scenario: str, *, client: int, repeats: int, threads: int) -> dict[str, float]:
    """Seconds of one round (best of interleaved repeats): uncached, cold and warm
    cached, and of one evaluation without and with the cache."""
    off, on = (_env(scenario, c, threads=threads) for c in ("off", "on"))
    start = _global(off)
    _round(off, client, start)  # warm-up: first-call costs of both paths, the split
    _round(on, client, start)
    runs: dict[str, list[float]] = {k: [] for k in ("uncached", "cold", "warm", "eval_off",
                                                   "eval_on")}
    for _ in range(repeats):
        runs["uncached"].append(_round(off, client, start)[0])
        on.trunk_cache.store.clear()  # as after a changed frozen weight: rebuild
        runs["cold"].append(_round(on, client, start)[0])
        runs["warm"].append(_round(on, client, start)[0])
        runs["eval_off"].append(_timed(lambda: off.evaluate_client(client)))
        runs["eval_on"].append(_timed(lambda: on.evaluate_client(client)))
    return {"n": off.client(client).num_train, "views": on.trunk_cache.plan.views,
            **{k: min(v) for k, v in runs.items()}}


def equality(scenario: str, *, client: int, threads: int) -> dict[str, float]:
    """One exact round (augment=none, seeded noise): cached against uncached."""
    extra = ("data.augment=none", "privacy.seeded_noise=true") \
        if scenario == "medical_dp" else ("data.augment=none",)
    on = _env(scenario, "on", *extra, threads=threads)
    plain = _env(scenario, "off", *extra, threads=threads)
    start = _global(on)
    results = {}
    for name, env in (("on", on), ("plain", plain)):
        _, metrics = _round(env, client, start)
        results[name] = (metrics["train/loss"], env.state())
    trained = on.trained_keys()
    (loss_on, state_on), (loss_plain, state_plain) = results["on"], results["plain"]
    diff = max(float((state_on[k] - state_plain[k]).abs().max()) for k in trained)
    return {"loss_on": loss_on, "loss_plain": loss_plain, "dw": diff, "trained": len(trained)}


def simulated(scenario: str, rounds: int, *, elision: bool) -> dict[str, dict[str, float]]:
    """The scenario's real simulation, cache off then auto: round seconds, final metrics;
    with ``elision`` each also with ``fl.elide_frozen=false`` (every array travels), first."""
    from fedimg.build import prepare_run
    from fedimg.resolve import compose_and_check
    from fedimg.simulation.engine import simulate

    variants = [(c, e) for c in ("off", "auto") for e in ((False, True) if elision else (True,))]
    out = {}
    for cache, elide in variants:
        name = cache if elide else f"{cache}, every array"
        cfg = compose_and_check(scenario, [
            *COMMON, f"rounds={rounds}", f"train.feature_cache={cache}",
            f"fl.elide_frozen={str(elide).lower()}",
            f"hydra.run.dir=bench_runs/cache_sim/{scenario}_{cache}_{elide}"])
        results = simulate(prepare_run(cfg))
        records = _records(results["run_dir"])
        walls = [r["wall_s"] for r in records]
        out[name] = {"warm_round_s": sum(walls[1:]) / max(1, len(walls) - 1),
                     "round_s": sum(walls) / len(walls),
                     "mb": sum(r["bytes/down"] + r["bytes/up"] for r in records) / 1e6,
                     "accuracy": results["final"].get("test/accuracy", float("nan")),
                     "auc": results["final"].get("test/auc", float("nan"))}
    return out


def _records(run_dir: str) -> list[dict[str, float]]:
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["round"] > 0]


def _print_simulated(scenarios: list[str], rounds: int, *, elision: bool) -> None:
    print(f"| scenario ({rounds} rounds, real simulation) | variant | round s (2+) | "
          "round s (all) | MB moved | **off / this (rounds 2+)** | all rounds | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    for scenario in scenarios:
        s = simulated(scenario, rounds, elision=elision)
        base = s["off, every array" if elision else "off"]
        for name, v in s.items():
            print(f"| {scenario} | {name} | {v['warm_round_s']:.2f} | {v['round_s']:.2f} | "
                  f"{v['mb']:.0f} | **{base['warm_round_s'] / v['warm_round_s']:.2f}x** | "
                  f"{base['round_s'] / v['round_s']:.2f}x | {v['accuracy']:.4f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="medical_dp,cameras")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--simulate", type=int, default=0, metavar="ROUNDS")
    parser.add_argument("--elision", action="store_true",
                        help="with --simulate: also every array in every message")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.simulate:
        _print_simulated(args.scenarios.split(","), args.simulate, elision=args.elision)
        return
    torch.set_num_threads(args.threads)
    print("| scenario | client images | K views | uncached s | cold s | warm s | "
          "**uncached / warm** | amortised x8 / x4 | eval off / on s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scenario in args.scenarios.split(","):
        t = timings(scenario, client=args.client, repeats=args.repeats, threads=args.threads)
        amort = {n: (t["cold"] + (n - 1) * t["warm"]) / n for n in (8, 4)}
        print(f"| {scenario} | {t['n']} | {t['views']} | {t['uncached']:.3f} | {t['cold']:.3f} "
              f"| {t['warm']:.3f} | **{t['uncached'] / t['warm']:.1f}x** | "
              f"{t['uncached'] / amort[8]:.2f}x / {t['uncached'] / amort[4]:.2f}x | "
              f"{t['eval_off']:.3f} / {t['eval_on']:.3f} |", flush=True)
    print("\n| scenario (augment=none) | loss cached | loss uncached | "
          "max abs diff of the trained weights |")
    print("|---|---|---|---|")
    for scenario in args.scenarios.split(","):
        e = equality(scenario, client=args.client, threads=args.threads)
        print(f"| {scenario} | {e['loss_on']:.6f} | {e['loss_plain']:.6f} | {e['dw']:.2e} |",
              flush=True)


if __name__ == "__main__":
    main()
