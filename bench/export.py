"""Edge export: size, CPU latency per image, accuracy and agreement of each format.

Usage::

    FEDIMG_DATA=../shared/data python bench/export.py <run_dir>
        [--checkpoint final|best] [--max-test N] [--calib 128] [--runs 100] [--out DIR]
    FEDIMG_DATA=../shared/data python bench/export.py --pretrained-demo [--image-size 48]

Exports the run's model with :func:`fedimg.export.export_run` (TorchScript, ONNX
fp32, ONNX int8 static QDQ) into ``--out`` (default: a temporary folder, so the
run directory is left alone) and prints, measured side by side in one invocation:
file size, CPU latency per image (batch 1, one thread, median of interleaved
runs), test accuracy and agreement with PyTorch fp32 eager, then the ratios that
matter on a camera: int8 size and latency relative to ONNX fp32, and the accuracy
int8 costs.

``--pretrained-demo`` needs no run: it fakes one with the camera setup of
``scenarios/cameras.yaml`` (EfficientNet-Lite0, ImageNet weights, last 2 blocks +
head, GTSRB at ``--image-size`` px, default 48) whose 43-class head is a ridge
regression (lambda 300) on 1000 training images' features, not a federated run,
so its accuracy is low; the sizes, latencies and int8 agreement are still those of
this architecture.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg.config import DataConfig, FedimgConfig, TransferConfig, to_dict  # noqa: E402
from fedimg.data import build_transform, load_dataset  # noqa: E402
from fedimg.export import export_run, format_table  # noqa: E402
from fedimg.export.measure import torch_threads  # noqa: E402
from fedimg.models import build_model  # noqa: E402
from fedimg.reporting import setup_logging  # noqa: E402


def _demo_run(run_dir: Path, *, image_size: int, fit_images: int = 1000) -> Path:
    """A fake camera run: pretrained Lite0 with a ridge-fitted head, saved as final.pt."""
    cfg = FedimgConfig(name="export-demo", seed=0, model="efficientnet_lite0",
                       data=DataConfig(dataset="gtsrb", image_size=image_size),
                       transfer=TransferConfig(mode="last_k", last_k=2, bn="train"))
    dataset = load_dataset(cfg.data, seed=cfg.seed)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=dataset.num_classes, weights="pretrained",
                        transfer=cfg.transfer).eval()
    idx = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))
    idx = idx[:fit_images]
    tf = build_transform("none", image_size=image_size, train=False)
    with torch.no_grad(), torch_threads(1):
        feats = torch.cat([model._avg_pooling(model.forward_features(tf(
            dataset.train.images[idx[i:i + 128]]))).flatten(1)
            for i in range(0, len(idx), 128)])  # (N, 1280)
        feats = torch.cat([feats, torch.ones(len(feats), 1)], dim=1).double()
        target = torch.nn.functional.one_hot(dataset.train.labels[idx],
                                             dataset.num_classes).double() * 10 - 5
        gram = feats.T @ feats + 300 * torch.eye(feats.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(gram, feats.T @ target).float()  # (1281, K)
        model._fc.weight.copy_(w[:-1].T)
        model._fc.bias.copy_(w[-1])
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    meta = {"round": 0, "model": cfg.model, "classes": list(dataset.classes),
            "seed": cfg.seed, "config": to_dict(cfg)}
    torch.save({"state_dict": model.state_dict(), "meta": meta},
               run_dir / "checkpoints" / "final.pt")
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("--pretrained-demo", action="store_true")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--checkpoint", default="final")
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if (args.run_dir is None) == (not args.pretrained_demo):
        parser.error("give a run directory or --pretrained-demo (not both)")
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="fedimg-export-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else _demo_run(
            Path(tmp) / "demo", image_size=args.image_size)
        report = export_run(run_dir, checkpoint=args.checkpoint,
                            out_dir=args.out or Path(tmp) / "export", max_test=args.max_test,
                            calib=args.calib, latency_runs=args.runs)
    art = report["artifacts"]
    fp32, int8 = art["onnx_fp32"], art["onnx_int8"]
    print(format_table(report))  # noqa: T201 - the benchmark's output
    print(f"int8 / fp32 ONNX: size {int8['bytes'] / fp32['bytes']:.3f}x, "  # noqa: T201
          f"latency {int8['latency_ms'] / fp32['latency_ms']:.2f}x, accuracy "
          f"{int8['accuracy'] - fp32['accuracy']:+.4f}; ONNX fp32 vs eager latency "
          f"{fp32['latency_ms'] / art['torch_fp32']['latency_ms']:.2f}x "
          f"({report['input']['shape'][2]} px, {report['data']['source']} data)")


if __name__ == "__main__":
    main()
