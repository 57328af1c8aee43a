"""Where local training runs: device selection and mixed-precision helpers.

``train.device`` is a string in the config. ``auto`` picks the first visible CUDA
device when there is one and the CPU otherwise; under Ray, each client sees only
the GPUs granted to it through ``CUDA_VISIBLE_DEVICES``, so ``cuda`` means "my
GPU". Mixed precision (AMP) and the channels_last memory format are CUDA-only
speed-ups: on the CPU both are switched off, whatever the config says.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

from fedimg.errors import ConfigError

_VALID = "auto, cpu, cuda, cuda:N"


def resolve_device(spec: str) -> torch.device:
    """Turn ``train.device`` into a :class:`torch.device`.

    ``auto`` -> ``cuda`` if CUDA is available, else ``cpu``. ``cuda`` or
    ``cuda:N`` without a usable GPU raises :class:`ConfigError` here, at build
    time, rather than a CUDA error in the middle of round 1.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", spec):
        raise ConfigError(f"train.device='{spec}' is unknown; valid: {_VALID}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"train.device='{spec}' but CUDA is not available (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}, no visible GPU); "
            "fix: set train.device=auto or cpu, or give the client a GPU "
            "(sim.num_gpus_per_client > 0)"
        )
    device = torch.device(spec)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"train.device='{spec}' but only {count} CUDA device(s) are visible "
            f"(valid: cuda:0 .. cuda:{count - 1}); fix: use train.device=cuda"
        )
    return device


def amp_dtype(device: torch.device, *, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for ``device``, or None when AMP is off.

    AMP runs only on CUDA: bfloat16 where the GPU supports it (Ampere and newer;
    same exponent range as float32, so no loss scaling is needed), else float16,
    which needs a :class:`torch.amp.GradScaler` against gradient underflow.
    """
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def use_channels_last(device: torch.device, *, enabled: bool) -> bool:
    """Whether to store 4-D tensors as NHWC: only on CUDA, where cuDNN is faster with it."""
    return enabled and device.type == "cuda"
