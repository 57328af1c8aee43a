"""Edge export of a run's global model: TorchScript, ONNX fp32, ONNX int8, and a report.

The facade of the package; import from here::

    from fedimg.export import export_run
    report = export_run("runs/cameras", checkpoint="final", max_test=500)

or run ``python -m fedimg.export <run_dir>``. Plain PyTorch + ONNX: this package
never imports flwr, ray or opacus.

**What the exported models expect** (also in ``report.json`` under ``input``):
float32 NCHW RGB images of the run's ``data.image_size``, resized (bilinear,
antialiased) and normalised exactly as fedimg's eval transform does,
``x = (uint8 / 255 - mean) / std`` with the ImageNet mean and std. The
normalisation is deliberately *not* inside the graph: the exported function is
the checkpoint's function, checked logit by logit against PyTorch, and a camera
pipeline usually resizes and converts on its own (often in hardware) anyway. The
output is ``logits`` (batch, num_classes), class ``i`` being ``classes[i]``.
The spatial size is fixed (the "same" padding of EfficientNet-Lite is traced at
that size); the batch axis is free.

Modules: :mod:`~fedimg.export.source` (checkpoint -> model, images),
:mod:`~fedimg.export.convert` (TorchScript, ONNX, int8, agreement checks),
:mod:`~fedimg.export.measure` (runners, latency, table),
:mod:`~fedimg.export.pipeline` (:func:`export_run`).
"""

from fedimg.export.convert import (
    CALIBRATION_METHODS,
    Agreement,
    compare_logits,
    export_onnx,
    export_torchscript,
    quantize_int8,
    require_agreement,
)
from fedimg.export.measure import (
    format_table,
    latency_ms,
    ort_runner,
    predict,
    torch_runner,
)
from fedimg.export.pipeline import FILES, export_run
from fedimg.export.source import (
    CHECKPOINTS,
    EvalData,
    RunModel,
    checkpoint_path,
    input_spec,
    load_eval_data,
    load_run_model,
)

__all__ = [
    "CALIBRATION_METHODS", "CHECKPOINTS", "FILES", "Agreement", "EvalData", "RunModel",
    "checkpoint_path", "compare_logits", "export_onnx", "export_run", "export_torchscript",
    "format_table", "input_spec", "latency_ms", "load_eval_data", "load_run_model",
    "ort_runner", "predict", "quantize_int8", "require_agreement", "torch_runner",
]
