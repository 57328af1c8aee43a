"""Where a client finds the frozen arrays a message left out: its model, then its weights."""

from __future__ import annotations

import types

import numpy as np
import torch
from torch import nn

from fedimg.clientapp.frozen_home import frozen_candidates
from fedimg.config import FedimgConfig


class _Env:
    """What ``frozen_candidates`` reads of a TaskEnvironment: its model, config, weights."""

    def __init__(self, weights: str, built: dict[str, torch.Tensor] | Exception) -> None:
        self.model = nn.Linear(2, 1)
        with torch.no_grad():
            self.model.weight.fill_(0.0)  # as a worker's model starts: no weights loaded
        self.cfg = types.SimpleNamespace(weights=weights)
        self._built = built

    @property
    def built_state(self) -> dict[str, torch.Tensor]:
        if isinstance(self._built, Exception):
            raise self._built
        return self._built


BUILT = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([3.0])}


def test_the_model_first_then_the_configured_weights() -> None:
    env = _Env("pretrained", BUILT)
    own, built = list(frozen_candidates(env, ("weight",), site=False))  # type: ignore[arg-type]
    assert own["weight"].tolist() == [[0.0, 0.0]] and built["weight"].tolist() == [[1.0, 2.0]]
    # copies: filling a message never aliases the live model or the built weights
    own["weight"][0, 0] = 9.0
    built["weight"][0, 0] = 9.0
    assert env.model.weight[0, 0].item() == 0.0 and BUILT["weight"][0, 0].item() == 1.0
    assert isinstance(own["weight"], np.ndarray)


def test_a_site_does_not_read_a_weights_file_the_server_names() -> None:
    env = _Env("/coordinator/only/weights.pt", BUILT)
    assert len(list(frozen_candidates(env, ("weight",), site=True))) == 1  # type: ignore[arg-type]
    assert len(list(frozen_candidates(env, ("weight",), site=False))) == 2  # type: ignore[arg-type]


def test_weights_it_cannot_build_leave_only_its_model(caplog) -> None:  # noqa: ANN001
    env = _Env("pretrained", OSError("no network to fetch the weights"))
    assert len(list(frozen_candidates(env, ("weight",), site=True))) == 1  # type: ignore[arg-type]
    assert "cannot build the configured weights" in caplog.text


def test_the_schema_sends_frozen_arrays_home_by_default() -> None:
    assert FedimgConfig().fl.elide_frozen is True
