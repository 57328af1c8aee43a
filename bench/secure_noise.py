"""Secure noise cost: ChaCha20 Gaussian noise (``privacy.secure_noise``) against Opacus' own.

Usage::

    python bench/secure_noise.py [--model efficientnet_lite0] [--batch 32] [--size 64]
        [--noise-repeats 21] [--step-repeats 7] [--threads 2]

Two measurements, each side by side in one invocation (A/B interleaved, so that
machine noise hits both alike; medians):

* **noise**: what ``add_noise`` does once per DP-SGD step, ``summed_grad + N(0, sigma^2
  C^2)`` for every trainable tensor of the model (full fine-tuning, frozen BatchNorm;
  EfficientNet-Lite0 with a 2-class head). Opacus: ``_generate_noise`` from a
  ``torch.Generator`` per tensor; secure: one
  :meth:`~fedimg.privacy.secure_noise.ChaChaStream.normal_like` call (keystream,
  53-bit uniforms, Box-Muller in float64, rounded to float32).
* **step**: one whole DP-SGD step (forward, per-sample gradients, clipping, noise,
  SGD) through :func:`fedimg.privacy.dp_sgd.make_private` with
  ``privacy.secure_noise`` false and true, on random images.

It prints the median milliseconds of each and the secure / Opacus ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opacus.optimizers.optimizer import _generate_noise  # noqa: E402

from fedimg.config import BatchNorm, FedimgConfig, PrivacyKind, TransferMode, validate  # noqa: E402
from fedimg.models import build_model, make_inplace_free  # noqa: E402
from fedimg.privacy.dp_sgd import make_private  # noqa: E402
from fedimg.privacy.secure_noise import ChaChaStream  # noqa: E402

log = logging.getLogger("bench.secure_noise")
warnings.filterwarnings("ignore")
SIGMA, CLIP = 1.0, 1.0


def _config(model: str, *, secure: bool) -> FedimgConfig:
    base = FedimgConfig()
    return validate(dataclasses.replace(
        base, model=model,
        transfer=dataclasses.replace(base.transfer, mode=TransferMode.full, bn=BatchNorm.frozen),
        train=dataclasses.replace(base.train, momentum=0.0),
        privacy=dataclasses.replace(base.privacy, mode=PrivacyKind.dp_sgd, secure_noise=secure)))


def _model(cfg: FedimgConfig) -> torch.nn.Module:
    return build_model(cfg.model, num_classes=2, weights="none", transfer=cfg.transfer)


def _noise_pair(cfg: FedimgConfig) -> tuple[Callable[[], None], Callable[[], None], int]:
    """Opacus' and the secure ``add_noise`` arithmetic over the model's trainable tensors."""
    sums = [torch.zeros_like(p) for p in _model(cfg).parameters() if p.requires_grad]
    generator, stream, std = torch.Generator().manual_seed(0), ChaChaStream(), SIGMA * CLIP

    def opacus() -> None:
        [s + _generate_noise(std=std, reference=s, generator=generator) for s in sums]

    def secure() -> None:
        [s + z for s, z in zip(sums, stream.normal_like(sums, std=std))]

    return opacus, secure, sum(s.numel() for s in sums)


def _step(cfg: FedimgConfig, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One DP-SGD step of a fresh model made private with ``cfg``."""
    gsm, opt = make_private(make_inplace_free(_model(cfg)), cfg=cfg, lr=0.01,
                            noise_multiplier=SIGMA, expected_batch_size=len(y),
                            device=torch.device("cpu"),
                            generator=torch.Generator().manual_seed(0))
    assert (opt.noise_stream is not None) == cfg.privacy.secure_noise

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        opt.step()

    return step


def _time(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - started)


def interleaved(a: Callable[[], None], b: Callable[[], None], repeats: int
                ) -> tuple[float, float]:
    """Median milliseconds of ``a`` and ``b``, timed alternately after one warm-up each."""
    a(), b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(_time(a))
        times_b.append(_time(b))
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--noise-repeats", type=int, default=21)
    parser.add_argument("--step-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    opacus, secure, count = _noise_pair(_config(args.model, secure=False))
    log.info("noise alone: %s trainable weights, %d interleaved repeats", f"{count:,}",
             args.noise_repeats)
    rows = [("noise alone", *interleaved(opacus, secure, args.noise_repeats))]
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 2, (args.batch,))
    log.info("whole DP-SGD step: batch %d, %d px, %d interleaved repeats", args.batch,
             args.size, args.step_repeats)
    rows.append(("whole DP-SGD step", *interleaved(
        _step(_config(args.model, secure=False), x, y),
        _step(_config(args.model, secure=True), x, y), args.step_repeats)))
    header = f"{'measured':<18} {'Opacus ms':>10} {'secure ms':>10} {'secure/Opacus':>14}"
    print(f"{args.model}, {count:,} trainable weights, sigma={SIGMA}, C={CLIP}, "  # noqa: T201
          f"{args.threads} threads, medians\n{header}\n{'-' * len(header)}")
    for name, a, b in rows:
        print(f"{name:<18} {a:>10.1f} {b:>10.1f} {b / a:>13.2f}x")  # noqa: T201


if __name__ == "__main__":
    main()
