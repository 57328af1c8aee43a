"""Many small clients per worker: sequential rounds against one vectorised round.

Usage::

    python bench/vectorize.py [--device cpu|cuda] [--ks 4,8,16] [--repeats 2]
        [--threads 2] [--image]

k camera-like clients, client i holding 16 * (1 + i % 3) samples (1-3 batches of 16,
the ``cameras`` scenario's batch size), one local epoch, SGD with momentum as cameras
trains. Three trainable parts of EfficientNet-Lite0 (ImageNet weights, 43 classes):

* ``tail``: cameras' ``transfer.mode=last_k last_k=2`` tail on cached trunk features of
  48 px images (block 15, 2 BatchNorm'd blocks and the head, BatchNorm training);
* ``head``: ``transfer.mode=head`` on cached features (dropout + the linear head);
* ``image`` (with ``--image``): the whole last_k model on 48 px images (the frozen
  trunk runs every step), as without the feature cache.

For each part and k: ``train_sequential`` (``train_local`` per client) and
``train_vectorized`` (one vmapped step per step), interleaved, the best of
``--repeats`` (by wall time), wall and process CPU time (steadier when the machine is
shared); ratio = sequential / vectorised (> 1: vectorising is faster). The
last column is what :class:`~fedimg.training.vector_rule.VectorizeRule` decides from
its probe (one step of each), which should agree with the measured ratio.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.config import TrainConfig, TransferConfig  # noqa: E402
from fedimg.models import build_model  # noqa: E402
from fedimg.models.split import split_model  # noqa: E402
from fedimg.training.vector_rule import VectorizeRule  # noqa: E402
from fedimg.training.vectorized import ClientJob, train_sequential, train_vectorized  # noqa: E402

warnings.filterwarnings("ignore")
CLASSES, BATCH, PIXELS = 43, 16, 48
CFG = TrainConfig(lr=0.02, momentum=0.9, weight_decay=1e-4, local_epochs=1, batch_size=BATCH)


def _part(name: str, device: torch.device) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The trainable module and how an image batch becomes its input."""
    mode = "head" if name == "head" else "last_k"
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", num_classes=CLASSES, weights="pretrained",
                        transfer=TransferConfig(mode=mode, last_k=2, bn="train")).to(device)
    if name == "image":
        return model, lambda x: x
    split = split_model(model, probe=torch.randn(2, 3, PIXELS, PIXELS, device=device))

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return split.trunk(x)

    return split.tail, features


def _jobs(k: int, prepare: Callable[[torch.Tensor], torch.Tensor],
          device: torch.device) -> list[ClientJob]:
    """k clients of 1-3 batches of 16 random images (inputs prepared once)."""
    g = torch.Generator().manual_seed(k)
    jobs = []
    for i in range(k):
        batches = []
        for _ in range(1 + i % 3):
            x = torch.rand(BATCH, 3, PIXELS, PIXELS, generator=g).to(device)
            batches.append((prepare(x), torch.randint(CLASSES, (BATCH,), generator=g).to(device)))
        jobs.append(ClientJob(loader=batches, seed=i))
    return jobs


def _time(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of ``run``; CPU time is steadier on a shared machine."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ks", default="4,8,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image", action="store_true", help="also the uncached last_k model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} threads={args.threads} batch={BATCH} px={PIXELS} "
          f"torch={torch.__version__}")
    print(f"{'part':6} {'k':>3} {'steps':>5} {'seq_wall':>8} {'vec_wall':>8} {'ratio':>5} "
          f"{'seq_cpu':>8} {'vec_cpu':>8} {'ratio':>5}  rule (probe seq/vec s)")
    for name in ("tail", "head", *(["image"] if args.image else [])):
        model, prepare = _part(name, device)
        rule = VectorizeRule()
        for k in (int(v) for v in args.ks.split(",")):
            jobs = _jobs(k, prepare, device)
            shape = tuple(jobs[0].loader[0][0].shape)
            kwargs = dict(cfg=CFG, lr=CFG.lr, device=device)
            train_vectorized(model, jobs[:2], **kwargs)  # warm-up
            seq, vec = [], []
            for _ in range(args.repeats):
                seq.append(_time(lambda: train_sequential(model, jobs, **kwargs), device))
                vec.append(_time(lambda: train_vectorized(model, jobs, **kwargs), device))
            d = rule.decide(model, k=k, batch_shape=shape, num_classes=CLASSES, cfg=CFG,
                            device=device)
            steps = sum(len(j.loader) for j in jobs)
            (sw, sc), (vw, vc) = min(seq), min(vec)
            print(f"{name:6} {k:>3} {steps:>5} {sw:>8.3f} {vw:>8.3f} {sw / vw:>5.2f} "
                  f"{sc:>8.3f} {vc:>8.3f} {sc / vc:>5.2f}  "
                  f"{'vectorised' if d.vectorize else 'sequential'}"
                  f" ({d.sequential_s:.4f}/{d.vectorized_s:.4f})", flush=True)


if __name__ == "__main__":
    main()
