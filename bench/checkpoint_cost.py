"""Cost of the per-round resume checkpoint (``checkpoints/last.pt``) against a plain model save.

Usage::

    python bench/checkpoint_cost.py [--model efficientnet_lite0] [--strategies fedavg,fedadam]
        [--repeats 5] [--out /tmp/fedimg-ckpt]

For each strategy it runs two FedAvg-style rounds of the real Flower strategy (so
FedAdam holds its float64 moments), then times, interleaved A/B so that machine noise
hits both alike:

* **plain**: ``torch.save`` of the model's state dict (what ``final.pt`` costs);
* **resume**: fedimg's ``last.pt``: exact global arrays, strategy state, RNG states,
  round records, written atomically with fsync.

It prints the file sizes, the median times and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.config import FederationConfig, FedimgConfig  # noqa: E402
from fedimg.serverapp.checkpoint import save_resume_state  # noqa: E402
from fedimg.serverapp.state import RunState, Sampler  # noqa: E402
from fedimg.transport.records import metric_record, reply_content  # noqa: E402
from fedimg.build import initial_model  # noqa: E402
from fedimg.serverapp.strategies import build_strategy  # noqa: E402
from fedimg.reporting import RunRecorder  # noqa: E402

logging.disable(logging.INFO)


class _Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _rounds(strategy, state: dict[str, torch.Tensor], rounds: int = 2) -> ArrayRecord:
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})
    for r in range(1, rounds + 1):
        random.seed(r)
        messages = strategy.configure_train(r, arrays, ConfigRecord(), _Nodes())
        replies = []
        for m in messages:
            step = 1e-3 * m.metadata.dst_node_id
            moved = {k: Array(np.asarray(v.numpy() + step, dtype=v.numpy().dtype)
                              if v.numpy().dtype.kind == "f" else np.asarray(v.numpy()))
                     for k, v in m.content["arrays"].items()}
            content = reply_content(metrics=metric_record({}, num_examples=10),
                                    arrays=ArrayRecord(moved))
            replies.append(Message(content, reply_to=m))
        arrays, _ = strategy.aggregate_train(r, replies)
    return arrays


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(model: str, name: str, repeats: int, out: Path) -> tuple[float, float, int, int]:
    cfg = FedimgConfig(model=model, strategy=name, clients=3,
                       fl=FederationConfig(min_train_clients=3))
    state, fixed, _, _ = initial_model(cfg, num_classes=2)
    strategy = build_strategy(cfg, buffer_keys=fixed)
    arrays = _rounds(strategy, state)
    recorder = RunRecorder(out / name)
    rounds = [{"round": r, "test/accuracy": 0.5} for r in range(3)]
    run_state = RunState(arrays=arrays, strategy=strategy, sampler=Sampler(cfg.seed),
                         round=2, rounds=rounds)

    def resume() -> None:
        save_resume_state(recorder, run_state, cfg, ["a", "b"])

    def plain() -> None:
        recorder.save_checkpoint("final", state, {"round": 2})

    times: dict[str, list[float]] = {"plain": [], "resume": []}
    for _ in range(repeats):
        times["plain"].append(_time(plain))
        times["resume"].append(_time(resume))
    size = {n: (out / name / "checkpoints" / f"{f}.pt").stat().st_size
            for n, f in (("plain", "final"), ("resume", "last"))}
    return (statistics.median(times["plain"]), statistics.median(times["resume"]),
            size["plain"], size["resume"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--strategies", default="fedavg,fedadam")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # ids outside an app
    out = Path(args.out or tempfile.mkdtemp(prefix="fedimg-ckpt-"))
    print("| strategy | final.pt MB | last.pt MB | plain s | resume s | **resume / plain** |")  # noqa: T201
    print("|---|---|---|---|---|---|")  # noqa: T201
    for name in args.strategies.split(","):
        plain, resume, plain_b, resume_b = measure(args.model, name, args.repeats, out)
        print(f"| {name} | {plain_b / 1e6:.1f} | {resume_b / 1e6:.1f} | {plain:.3f} | "  # noqa: T201
              f"{resume:.3f} | **{resume / plain:.2f}×** |")


if __name__ == "__main__":
    main()
