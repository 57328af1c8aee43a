"""The gradient offset a training message carries: read for trained parameters only, checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedimg.clientapp.drift import grad_offset
from fedimg.errors import UpdateError
from fedimg.transport.records import GRAD_OFFSET_KEY

REFERENCE = {"fc.weight": torch.zeros(2, 3), "bn.running_mean": torch.zeros(3)}
TRAINED = frozenset({"fc.weight"})


def _records(**arrays: np.ndarray) -> dict:
    return {GRAD_OFFSET_KEY: ArrayRecord({k.replace("_", "."): Array(v)
                                          for k, v in arrays.items()})}


def test_a_message_without_an_offset_trains_plainly() -> None:
    assert grad_offset({}, trained=TRAINED, reference=REFERENCE) is None


def test_the_offset_of_a_trained_parameter_is_read_as_float32() -> None:
    offset = grad_offset(_records(fc_weight=np.full((2, 3), 0.5)), trained=TRAINED,
                         reference=REFERENCE)
    assert offset is not None and offset["fc.weight"].dtype == torch.float32
    assert offset["fc.weight"].tolist() == [[0.5] * 3] * 2


@pytest.mark.parametrize(("arrays", "message"), [
    ({"bn_running_mean": np.zeros(3, np.float32)}, "does not train"),
    ({"fc_weight": np.zeros((3, 2), np.float32)}, "shape \\(2, 3\\)"),
    ({"fc_weight": np.full((2, 3), np.nan, np.float32)}, "not a finite float array"),
    ({"fc_weight": np.zeros((2, 3), np.int64)}, "not a finite float array"),
])
def test_an_offset_the_client_cannot_apply_fails_the_message(arrays, message) -> None:
    with pytest.raises(UpdateError, match=message):
        grad_offset(_records(**arrays), trained=TRAINED, reference=REFERENCE)
