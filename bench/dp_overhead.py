"""DP-SGD cost: the time of one private training step over one non-private step.

Usage::

    python bench/dp_overhead.py [--models efficientnet_lite0,resnet18]
        [--modes full,last_k,head] [--batch 32] [--size 32] [--repeats 7] [--threads 2]
        [--grad-sample auto|hooks,functorch,ghost_mixed]

For every (model, transfer mode) it builds the model as a client does (frozen
BatchNorm, ``transfer.mode``), then times, interleaved (plain, then each DP mode, in
every repeat) so that machine noise hits all alike:

* **plain**: forward, cross-entropy, backward, SGD step on the model;
* **DP**: the same step through fedimg's DP path (:func:`fedimg.privacy.dp_sgd.make_private`:
  the in-place-free model wrapped for the grad-sample mode, per-sample clipping with the
  clipped fraction counted, Gaussian noise, SGD step), once per ``--grad-sample`` mode:
  ``hooks``/``functorch`` materialise per-sample gradients (Opacus' GradSampleModule),
  ``ghost_mixed`` computes only their norms (mixed ghost clipping, two backward passes).

and prints one row per (model, transfer): the median plain time, then each mode's
median DP time and DP/plain ratio side by side. Random 3-channel images, two classes;
the logical batch equals the physical batch (no BatchMemoryManager split).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.config import (  # noqa: E402
    BatchNorm,
    FedimgConfig,
    GradSampleMode,
    TransferMode,
    validate,
)
from fedimg.models import build_model, make_inplace_free  # noqa: E402
from fedimg.privacy.dp_sgd import grad_sample_mode, make_private  # noqa: E402
from fedimg.training import build_optimizer  # noqa: E402

warnings.filterwarnings("ignore")


def _config(model: str, mode: str, grad_sample: str) -> FedimgConfig:
    base = FedimgConfig()
    return validate(dataclasses.replace(
        base, model=model,
        transfer=dataclasses.replace(base.transfer, mode=TransferMode(mode), bn=BatchNorm.frozen),
        train=dataclasses.replace(base.train, momentum=0.0),
        privacy=dataclasses.replace(base.privacy, grad_sample_mode=GradSampleMode(grad_sample))))


def _batch(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))


def _build(cfg: FedimgConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(cfg.model, num_classes=2, weights="none", transfer=cfg.transfer)


def _plain_step(cfg: FedimgConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = _build(cfg).train()
    opt = build_optimizer(model.parameters(), cfg=cfg.train, lr=0.01)

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return plain


def _private_step(cfg: FedimgConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    module, opt = make_private(make_inplace_free(_build(cfg)), cfg=cfg, lr=0.01,
                               noise_multiplier=1.0, expected_batch_size=len(y),
                               device=torch.device("cpu"))

    def private() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        opt.step()

    return private


def _time(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def measure(model: str, mode: str, *, batch: int, size: int, repeats: int,
            grad_samples: list[str]) -> tuple[float, list[tuple[str, float]]]:
    """Median plain step ms, and (resolved mode, median DP step ms) per grad-sample mode.

    All steps are interleaved: every repeat times plain, then each DP mode once.
    """
    x, y = _batch(batch, size)
    configs = [_config(model, mode, gs) for gs in grad_samples]
    steps = [_plain_step(configs[0], x, y), *(_private_step(cfg, x, y) for cfg in configs)]
    for step in steps:
        step()  # warm-up: allocator, functorch transforms
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, sink in zip(steps, times):
            sink.append(_time(step))
    plain, *private = (1000 * statistics.median(t) for t in times)
    return plain, [(grad_sample_mode(cfg), ms) for cfg, ms in zip(configs, private)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet18")
    parser.add_argument("--modes", default="full,last_k,head")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grad-sample", default="auto",
                        help="comma-separated modes to compare side by side (auto = per "
                             "model; hooks, functorch, ghost_mixed)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grad_samples = args.grad_sample.split(",")
    header = f"{'model':<20} {'transfer':<8} {'plain ms':>9}" + "".join(
        f" | {'mode':<11} {'DP ms':>8} {'DP/plain':>8}" for _ in grad_samples)
    print(f"batch {args.batch}, {args.size} px, {args.threads} threads, "  # noqa: T201
          f"median of {args.repeats} interleaved steps\n{header}\n{'-' * len(header)}")
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            plain, private = measure(model, mode, batch=args.batch, size=args.size,
                                     repeats=args.repeats, grad_samples=grad_samples)
            cells = "".join(f" | {gs:<11} {ms:>8.1f} {ms / plain:>7.2f}x" for gs, ms in private)
            print(f"{model:<20} {mode:<8} {plain:>9.1f}{cells}", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
