"""Simulation overhead: Flower + Ray wall time over rounds vs. the same compute in one process.

Usage (any scenario overrides may follow)::

    FEDIMG_DATA=../shared/data python bench/sim_overhead.py scenario=medical rounds=3

It runs, side by side in one invocation:

1. **pure compute**: one process, no Flower, no Ray. For every round and every
   client the simulation sampled in that round it loads the global weights, runs the same local training steps
   (:meth:`fedimg.clientapp.environment.TaskEnvironment.train`, same model, data, batch size and
   steps) and FedAvg-averages the results; the client validation and central test
   evaluations are timed separately.
2. **simulation**: the real run (``fedimg.simulation.engine.simulate``), Ray backend; it runs
   first, and the pure side replays its sample of clients.

Simulated device heterogeneity (``hetero.*``) and personalization change how much
work a round does, so pass ``hetero.availability=1 hetero.dropout=0 ...`` or use
``--engine-only`` (sets them off) to measure the engine itself.

and prints the ratios ``sim rounds / pure training`` (the headline figure) and
``sim rounds / (pure training + the same evaluations)``, plus the start-up cost
(Ray, worker actors, data decoding) which is reported apart from the rounds.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.config.compose import split_argv  # noqa: E402

from fedimg.resolve import compose_and_check  # noqa: E402
from fedimg.config import FedimgConfig  # noqa: E402
from fedimg.simulation.engine import simulate  # noqa: E402
from fedimg.build import prepare_run  # noqa: E402
from fedimg.models import build_model  # noqa: E402
from fedimg.reporting import setup_logging  # noqa: E402
from fedimg.clientapp.environment import TaskEnvironment  # noqa: E402
from fedimg.serverapp.evaluation import CentralEvaluator  # noqa: E402

log = logging.getLogger("fedimg.bench")
ENGINE_ONLY = ["hetero.availability=1", "hetero.dropout=0", "hetero.speed_sigma=0",
               "hetero.speed_factors=null", "hetero.deadline_s=null",
               "hetero.uplink_mbps=null", "hetero.downlink_mbps=null",
               "fl.personalize_steps=0"]


def _average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict:
    total = float(sum(weights))
    return {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(v.dtype)
            for k, v in states[0].items()}


def _plan(rounds: list[dict]) -> dict[int, tuple[list[int], list[int]]]:
    """Which clients trained and evaluated in each round of the simulation."""
    plan = {}
    for r in rounds:
        if r["round"] > 0:
            clients = r["clients"]
            plan[r["round"]] = (
                sorted(int(p) for p, c in clients.items() if "train" in c
                       and "train_status" not in c),
                sorted(int(p) for p, c in clients.items() if "val" in c
                       and "val_status" not in c))
    return plan


def pure_compute(cfg: FedimgConfig, prepared,
                 plan: dict[int, tuple[list[int], list[int]]]) -> dict[str, float]:
    """The same local steps, back to back in this process; seconds per phase.

    ``plan`` names the clients the simulation sampled in each round (partial
    participation); they train and evaluate here in the same rounds.
    """
    env = TaskEnvironment(cfg)  # torch uses all cores of this process
    central = CentralEvaluator(cfg, prepared.dataset)
    torch.manual_seed(cfg.seed)
    state = build_model(cfg.model, num_classes=env.num_classes, weights=cfg.weights,
                        transfer=cfg.transfer).state_dict()
    train_s = eval_s = 0.0
    for server_round in range(1, cfg.rounds + 1):
        states, weights = [], []
        trainers, evaluators = plan[server_round]
        for pid in trainers:
            env.load_state(state)
            started = time.perf_counter()
            _, n = env.train(pid, server_round=server_round)
            train_s += time.perf_counter() - started
            states.append(env.state())
            weights.append(n)
        state = _average(states, weights)
        started = time.perf_counter()
        for pid in evaluators:
            env.load_state(state)
            env.evaluate_client(pid)
        metrics = central(state)
        eval_s += time.perf_counter() - started
        log.info("pure round %d: test acc %.4f", server_round, metrics["test/accuracy"])
    return {"train_s": train_s, "eval_s": eval_s}


def main(argv: list[str]) -> None:
    setup_logging()
    engine_only = "--engine-only" in argv
    scenario, overrides = split_argv([a for a in argv if a != "--engine-only"])
    if engine_only:
        overrides = [*ENGINE_ONLY, *overrides]
    run_dir = Path(tempfile.mkdtemp(prefix="fedimg-bench-"))
    cfg = compose_and_check(scenario, [*overrides, f"hydra.run.dir={run_dir}",
                                    "output.progress=false", "output.checkpoints=false"])
    prepared = prepare_run(cfg)
    results = simulate(prepared)  # first: the pure side replays the clients it sampled
    rounds = prepared.recorder.read_rounds()
    pure = pure_compute(cfg, prepare_run(cfg), _plan(rounds))
    sim_rounds = results["timing"]["rounds_s"]
    pure_all = pure["train_s"] + pure["eval_s"]
    trained = [r for r in rounds if r["round"] > 0]
    client_train = sum(c["train"]["train/seconds"] for r in trained
                       for c in r["clients"].values() if "train" in c)
    central = sum(r["central_eval_s"] for r in trained)
    lines = [
        f"scenario={cfg.name} model={cfg.model} clients={cfg.clients} rounds={cfg.rounds} "
        f"image_size={cfg.data.image_size} cpus/client={cfg.sim.num_cpus_per_client}",
        f"pure compute: training {pure['train_s']:.1f}s, evaluations {pure['eval_s']:.1f}s",
        f"simulation:   rounds {sim_rounds:.1f}s, start-up {results['timing']['startup_s']:.1f}s",
        f"  inside the rounds: client training {client_train:.1f}s summed over clients "
        f"(in parallel workers), central evaluation {central:.1f}s",
        f"ratio sim rounds / pure training             = {sim_rounds / pure['train_s']:.3f}",
        f"ratio sim rounds / (pure training + evals)   = {sim_rounds / pure_all:.3f}",
        f"final test accuracy (simulation) = {results['final'].get('test/accuracy', float('nan')):.4f}",
    ]
    log.info("sim overhead benchmark\n%s", "\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
