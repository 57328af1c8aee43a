"""resolve_device: auto, cpu, and helpful errors for a missing GPU."""

from __future__ import annotations

import pytest
import torch

from fedimg.errors import ConfigError
from fedimg.training import resolve_device
from fedimg.training.device import amp_dtype, use_channels_last


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this machine has no GPU, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_is_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_without_cuda_is_cpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_without_cuda_is_a_config_error(no_cuda):
    fix = "fix: set train.device=auto or cpu"
    with pytest.raises(ConfigError, match=f"train.device='cuda'.*{fix}"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_config_error_unpatched():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_cuda_index_beyond_visible_devices(monkeypatch: pytest.MonkeyPatch):
    # Arrange: one visible GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    # Act / Assert
    with pytest.raises(ConfigError, match=r"only 1 CUDA device.*cuda:0 \.\. cuda:0"):
        resolve_device("cuda:3")


def test_unknown_spec_lists_valid_values():
    with pytest.raises(ConfigError, match="'gpu' is unknown; valid: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")


def test_amp_and_channels_last_are_off_on_cpu():
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, enabled=True) is None
    assert use_channels_last(cpu, enabled=True) is False
