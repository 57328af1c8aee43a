"""DP-SGD cost: the time of one private training step over one non-private step.

Usage::

    python bench/dp_overhead.py [--models efficientnet_lite0,resnet18]
        [--modes full,last_k,head] [--batch 32] [--size 32] [--repeats 7] [--threads 2]

For every (model, transfer mode) it builds the model as a client does (frozen
BatchNorm, ``transfer.mode``), then times, interleaved A/B so that machine noise hits
both alike:

* **plain**: forward, cross-entropy, backward, SGD step on the model;
* **DP**: the same step through fedimg's DP path (:func:`fedimg.privacy.dp_sgd.make_private`:
  the in-place-free model in Opacus' GradSampleModule with the model's measured
  grad-sample mode, per-sample clipping with the clipped fraction counted, Gaussian
  noise, SGD step).

and prints the median time of each and their ratio. Random 3-channel images, two
classes; the logical batch equals the physical batch (no BatchMemoryManager split).
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


def _steps(cfg: FedimgConfig, batch: int, size: int) -> tuple[Callable[[], None],
                                                               Callable[[], None], str]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    device = torch.device("cpu")

    def build() -> torch.nn.Module:
        return build_model(cfg.model, num_classes=2, weights="none", transfer=cfg.transfer)

    plain_model = build().train()
    plain_opt = build_optimizer(plain_model.parameters(), cfg=cfg.train, lr=0.01)
    gsm, dp_opt = make_private(make_inplace_free(build()), cfg=cfg, lr=0.01,
                               noise_multiplier=1.0, expected_batch_size=batch, device=device)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(x), y).backward()
        plain_opt.step()

    def private() -> None:
        dp_opt.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        dp_opt.step()

    return plain, private, grad_sample_mode(cfg)


def _time(step: Callable[[], None]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def measure(model: str, mode: str, *, batch: int, size: int, repeats: int,
            grad_sample: str = "auto") -> dict[str, float]:
    """Median plain and DP step times (interleaved) and their ratio."""
    plain, private, gs_mode = _steps(_config(model, mode, grad_sample), batch, size)
    plain(), private()  # warm-up: allocator, functorch transforms
    plain_s, dp_s = [], []
    for _ in range(repeats):
        plain_s.append(_time(plain))
        dp_s.append(_time(private))
    p, d = statistics.median(plain_s), statistics.median(dp_s)
    return {"plain_ms": 1000 * p, "dp_ms": 1000 * d, "ratio": d / p, "mode": gs_mode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet18")
    parser.add_argument("--modes", default="full,last_k,head")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grad-sample", default="auto",
                        help="comma-separated Opacus modes to compare (auto = per model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = (f"{'model':<20} {'transfer':<8} {'grad-sample':<11} {'plain ms':>9} "
              f"{'DP ms':>9} {'DP/plain':>9}")
    print(f"batch {args.batch}, {args.size} px, {args.threads} threads, "  # noqa: T201
          f"median of {args.repeats} interleaved steps\n{header}\n{'-' * len(header)}")
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for gs in args.grad_sample.split(","):
                _row(model, mode, measure(model, mode, batch=args.batch, size=args.size,
                                          repeats=args.repeats, grad_sample=gs))


def _row(model: str, mode: str, r: dict[str, float]) -> None:
    print(f"{model:<20} {mode:<8} {r['mode']:<11} {r['plain_ms']:>9.1f} "  # noqa: T201
          f"{r['dp_ms']:>9.1f} {r['ratio']:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
