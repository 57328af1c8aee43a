"""Running the artefacts side by side: logits, CPU latency per image, sizes, the table.

Every artefact is wrapped as a :data:`Runner`, float32 (B, 3, S, S) -> logits (B, K)
as NumPy arrays, so eager PyTorch, TorchScript and ONNX Runtime are measured the
same way. Latency is that of one image (batch 1) on one intra-op thread (how a
small edge CPU runs it, and steadier on a shared machine): after a warm-up the
runners take turns, one call each per round, so background load hits them alike,
and the median of the rounds is reported.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Runner = Callable[[np.ndarray], np.ndarray]  # float32 (B, 3, S, S) -> logits (B, K)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run PyTorch with ``n`` intra-op threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_runner(module: nn.Module | torch.jit.ScriptModule) -> Runner:
    """A runner over an eager or TorchScript module (inference mode)."""
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def ort_runner(path: str | Path, *, threads: int = 1) -> Runner:
    """A runner over an ONNX file on ONNX Runtime's CPU provider, ``threads`` intra-op."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run


def predict(runner: Runner, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Logits (N, K) of ``images`` (N, 3, S, S), in batches."""
    return np.concatenate([runner(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])


def latency_ms(runners: dict[str, Runner], example: np.ndarray, *, warmup: int = 10,
               runs: int = 50) -> dict[str, float]:
    """Median milliseconds per call of each runner on ``example`` (interleaved rounds)."""
    for run in runners.values():
        for _ in range(warmup):
            run(example)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run(example)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of (N, K) logits against (N,) labels."""
    return float((logits.argmax(axis=1) == labels).mean())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the eager model's weight file."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


_COLUMNS = (("artefact", "name", "{}"), ("MB", "mb", "{:.2f}"),
            ("ms/img", "latency_ms", "{:.2f}"), ("test acc", "accuracy", "{:.4f}"),
            ("top-1 agree", "top1_agreement", "{:.4f}"), ("max |dlogit|", "max_abs_diff", "{:.2e}"),
            ("rel rms dlogit", "rel_rms_diff", "{:.2e}"))


def format_table(report: dict[str, Any]) -> str:
    """The report's artefacts as a plain-text table, plus what it was measured on."""
    rows = []
    for name, art in report["artifacts"].items():
        values = {"name": name, **art}
        rows.append([fmt.format(values[key]) if values.get(key) is not None else "-"
                     for _, key, fmt in _COLUMNS])
    header = [title for title, _, _ in _COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    data, settings = report["data"], report["settings"]
    lines.append(f"test images: {data['test_examples']} of {data['test_split_size']} "
                 f"({data['dataset']}, {data['source']}); latency: batch 1, "
                 f"{settings['threads']} thread, median of {settings['latency_runs']}; "
                 f"agreement vs PyTorch fp32 eager")
    return "\n".join(lines)
