"""``python -m fedimg.export <run_dir>``: export a run's model for edge devices.

Writes ``model.ts``, ``model.onnx``, ``model.int8.onnx`` and ``report.json`` to
``<run_dir>/export`` (or ``--out``) and logs a table of sizes, CPU latency per
image, test accuracy and agreement with the PyTorch model. A missing run
directory or checkpoint, a corrupt checkpoint, or an ONNX/TorchScript model that
disagrees with PyTorch ends with a one-line error and exit code 4 (ModelError).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedimg.cli import run_cli
from fedimg.export.convert import CALIBRATION_METHODS, DEFAULT_OPSET


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedimg.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory (holds checkpoints/ and config.json)")
    parser.add_argument("--checkpoint", default="final",
                        help="final (default), best, or a path to a .pt checkpoint")
    parser.add_argument("--max-test", type=int, default=None,
                        help="evaluate on a seeded subset of N test images (default: all)")
    parser.add_argument("--calib", type=int, default=128,
                        help="training images used to calibrate int8 ranges (default 128)")
    parser.add_argument("--int8-method", choices=CALIBRATION_METHODS, default="minmax")
    parser.add_argument("--int8-float-first", type=int, default=2,
                        help="first N Conv layers kept float in the int8 model (default 2)")
    parser.add_argument("--out", default=None, help="output folder (default <run_dir>/export)")
    parser.add_argument("--data-root", default=None,
                        help="data root if not the run's (else data.root, then $FEDIMG_DATA)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="max abs logit difference allowed for TorchScript and ONNX fp32")
    parser.add_argument("--runs", type=int, default=50, help="timed latency runs (median)")
    return parser


def run(argv: Sequence[str]) -> dict:
    """Parse ``argv``, export, return the report."""
    from fedimg.export.pipeline import export_run
    from fedimg.reporting import setup_logging

    args = _parser().parse_args(list(argv))
    setup_logging()
    return export_run(args.run_dir, checkpoint=args.checkpoint, out_dir=args.out,
                      max_test=args.max_test, calib=args.calib, data_root=args.data_root,
                      opset=args.opset, atol=args.atol, int8_method=args.int8_method,
                      int8_float_first=args.int8_float_first,
                      latency_runs=args.runs)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    return run_cli(run, argv, doc=_parser().format_help())


if __name__ == "__main__":
    sys.exit(main())
