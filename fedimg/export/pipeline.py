"""One export: checkpoint -> TorchScript, ONNX fp32, ONNX int8 -> checked, measured, reported.

Files written to ``<out>`` (default ``<run_dir>/export``)::

    model.ts          TorchScript (traced), fp32
    model.onnx        ONNX opset 17, fp32, dynamic batch axis
    model.int8.onnx   ONNX, static int8 QDQ (per-channel weights), calibrated on train images
    report.json       input spec, sizes, latencies, accuracies, agreement, versions
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedimg.errors import ModelError
from fedimg.export.convert import (
    DEFAULT_OPSET,
    compare_logits,
    export_onnx,
    export_torchscript,
    load_torchscript,
    quantize_int8,
    require_agreement,
)
from fedimg.export.measure import (
    accuracy,
    format_table,
    latency_ms,
    ort_runner,
    predict,
    state_dict_bytes,
    torch_runner,
    torch_threads,
)
from fedimg.reporting.paths import RunPaths
from fedimg.export.source import (
    EvalData,
    RunModel,
    input_spec,
    load_eval_data,
    load_run_model,
    output_spec,
)

log = logging.getLogger(__name__)

FILES = {"torchscript": "model.ts", "onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx"}
INT8_WARN_AGREEMENT = 0.95  # below this top-1 agreement the int8 model gets a warning
_VERSIONS = ("fedimg", "torch", "onnx", "onnxruntime", "numpy")


def export_run(
    run_dir: str | Path,
    *,
    checkpoint: str = "final",
    out_dir: str | Path | None = None,
    max_test: int | None = None,
    calib: int = 128,
    data_root: str | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    int8_method: str = "minmax",
    int8_float_first: int = 2,
    latency_runs: int = 50,
    warmup: int = 10,
) -> dict[str, Any]:
    """Export a run's checkpoint for edge devices; return (and write) the report.

    Raises :class:`ModelError` for a missing or corrupt checkpoint, and when the
    TorchScript or fp32 ONNX logits differ from PyTorch's by more than
    ``atol + rtol * max |logit|`` (:func:`~fedimg.export.convert.logit_tolerance`).
    The int8 model's agreement is measured and reported, never enforced.
    """
    for name, value, low in (("max_test", max_test, 1), ("calib", calib, 1),
                             ("latency_runs", latency_runs, 1), ("warmup", warmup, 0)):
        if value is not None and value < low:
            raise ModelError(f"{name}={value} must be >= {low}")
    loaded = load_run_model(run_dir, checkpoint=checkpoint)
    data = load_eval_data(loaded.cfg, max_test=max_test, calib=calib, data_root=data_root)
    out = Path(out_dir) if out_dir is not None else RunPaths(run_dir).export
    out.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (model=%s, %d classes, round %s) to %s", loaded.checkpoint,
             loaded.cfg.model, len(loaded.classes), loaded.round, out)
    # One thread, as on a small edge CPU; on a busy shared CPU it is also far faster
    # than several threads spin-waiting for each other (measured 100x here).
    with torch_threads(1):
        seconds = write_artifacts(loaded.model, data, out, opset=opset,
                                  int8_method=int8_method, int8_float_first=int8_float_first)
        artifacts = measure_artifacts(loaded, data, out, atol=atol, rtol=rtol,
                                      latency_runs=latency_runs, warmup=warmup)
    for name, value in seconds.items():
        artifacts[name]["export_seconds"] = value
    if artifacts["onnx_int8"]["top1_agreement"] < INT8_WARN_AGREEMENT:
        log.warning("the int8 model agrees with fp32 on only %.1f%% of test images: check "
                    "its accuracy before shipping it (--int8-float-first 3 or more, more "
                    "--calib images or --int8-method percentile/entropy may help)",
                    100 * artifacts["onnx_int8"]["top1_agreement"])
    report = {
        "run_dir": str(run_dir), "checkpoint": str(loaded.checkpoint), "round": loaded.round,
        "model": loaded.cfg.model, "classes": list(loaded.classes),
        "input": input_spec(loaded.cfg), "output": output_spec(len(loaded.classes)),
        "data": data.provenance, "artifacts": artifacts,
        "settings": {"opset": opset, "atol": atol, "rtol": rtol, "int8": {
            "format": "QDQ", "weights": "int8 per-channel", "activations": "int8 per-tensor",
            "calibration": int8_method, "calibration_images": len(data.calib_x),
            "float_layers": f"first {int8_float_first} Conv and the logits layer"},
            "threads": 1, "latency_batch": 1, "latency_runs": latency_runs, "warmup": warmup},
    }
    # Imported here: importing fedimg.reporting loads matplotlib.
    from fedimg.reporting.run_dir import library_versions, write_json

    report["versions"] = library_versions(_VERSIONS)

    write_json(out / "report.json", report)
    log.info("export report (%s)\n%s", out / "report.json", format_table(report))
    return report


def write_artifacts(model: torch.nn.Module, data: EvalData, out: Path, *, opset: int,
                    int8_method: str, int8_float_first: int = 2) -> dict[str, float]:
    """Write the three files of :data:`FILES` to ``out``; return seconds spent on each."""
    seconds: dict[str, float] = {}
    example = data.calib_x[:2]  # (2, 3, S, S): a batch of 2 keeps the batch axis general
    with _timed(seconds, "torchscript"):
        export_torchscript(model, example, out / FILES["torchscript"])
    with _timed(seconds, "onnx_fp32"):
        export_onnx(model, example, out / FILES["onnx_fp32"], opset=opset)
    with _timed(seconds, "onnx_int8"):
        quantize_int8(out / FILES["onnx_fp32"], out / FILES["onnx_int8"],
                      calibration=data.calib_x, method=int8_method,
                      float_first=int8_float_first)
    return seconds


def measure_artifacts(loaded: RunModel, data: EvalData, out: Path, *, atol: float,
                      rtol: float, latency_runs: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Size, latency, accuracy and agreement with eager PyTorch of each artefact.

    Raises :class:`ModelError` if TorchScript or ONNX fp32 logits are off by more
    than :func:`~fedimg.export.convert.logit_tolerance`.
    """
    runners = {"torch_fp32": torch_runner(loaded.model),
               "torchscript": torch_runner(load_torchscript(out / FILES["torchscript"])),
               "onnx_fp32": ort_runner(out / FILES["onnx_fp32"]),
               "onnx_int8": ort_runner(out / FILES["onnx_int8"])}
    test_x, test_y = data.test_x.numpy(), data.test_y.numpy()
    with torch_threads(1):  # latency: one image on one thread
        logits = {name: predict(run, test_x) for name, run in runners.items()}
        latency = latency_ms(runners, test_x[:1], warmup=warmup, runs=latency_runs)
    reference = logits["torch_fp32"]
    agreement = {"torch_fp32": compare_logits(reference, reference),
                 "torchscript": require_agreement("TorchScript", reference,
                                                  logits["torchscript"], atol=atol, rtol=rtol),
                 "onnx_fp32": require_agreement("ONNX fp32", reference, logits["onnx_fp32"],
                                                atol=atol, rtol=rtol),
                 "onnx_int8": compare_logits(reference, logits["onnx_int8"])}
    sizes = {"torch_fp32": state_dict_bytes(loaded.model),
             **{name: (out / file).stat().st_size for name, file in FILES.items()}}
    return {name: {"file": FILES.get(name, str(loaded.checkpoint)), "bytes": sizes[name],
                   "mb": sizes[name] / 2**20, "latency_ms": latency[name],
                   "accuracy": accuracy(logits[name], test_y), **agreement[name].as_dict()}
            for name in runners}


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start

