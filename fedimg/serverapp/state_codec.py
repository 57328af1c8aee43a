"""The run state as JSON and tensors, so that ``last.pt`` loads without unpickling.

``torch.load(weights_only=True)`` accepts only tensors and plain containers, so a
crafted checkpoint cannot run code when a run is resumed. :func:`encode` turns the
values a run state holds (numbers, strings, lists, tuples, sets, dicts with any
keys, NumPy arrays and scalars, torch tensors, Flower ArrayRecords, privacy
ledgers) into JSON that refers to tensors by name; :func:`decode` is its inverse.
Anything else is refused when it is saved, naming the attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedimg.privacy.accounting import PrivacyLedger

Tensors = dict[str, torch.Tensor]


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """Raw bytes of ``arr`` (any dtype, any shape) as a uint8 tensor."""
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return torch.from_numpy(data.copy())


def encode(value: Any, tensors: Tensors, path: str = "state") -> Any:
    """``value`` as JSON-able data; arrays and tensors go into ``tensors`` under ``path``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        tensors[path] = _array_to_tensor(value)
        return {"__ndarray__": path, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().clone()
        return {"__tensor__": path}
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": [[k, encode(v.numpy(), tensors, f"{path}.{k}")]
                                    for k, v in value.items()]}
    if isinstance(value, PrivacyLedger):
        return {"__ledger__": value.to_dict()}
    return _encode_container(value, tensors, path)


def _encode_container(value: Any, tensors: Tensors, path: str) -> Any:
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted(encode(v, tensors, path) for v in value)}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__map__": [[encode(k, tensors, path), encode(v, tensors, f"{path}.{i}")]
                            for i, (k, v) in enumerate(value.items())]}
    raise TypeError(f"{path} is a {type(value).__name__}, which a checkpoint cannot hold "
                    "without pickle")


def _decode_array(spec: dict[str, Any], tensors: Tensors) -> np.ndarray:
    raw = tensors[spec["__ndarray__"]].numpy()
    return raw.view(np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()


_TAGGED: dict[str, Callable[[dict[str, Any], Tensors], Any]] = {
    "__ndarray__": _decode_array,
    "__tensor__": lambda spec, t: t[spec["__tensor__"]].clone(),
    "__arrayrecord__": lambda spec, t: ArrayRecord(
        {k: Array(np.asarray(decode(v, t), order="C")) for k, v in spec["__arrayrecord__"]}),
    "__ledger__": lambda spec, t: PrivacyLedger.from_dict(spec["__ledger__"]),
    "__tuple__": lambda spec, t: tuple(decode(v, t) for v in spec["__tuple__"]),
    "__set__": lambda spec, t: frozenset(decode(v, t) for v in spec["__set__"]),
    "__map__": lambda spec, t: {decode(k, t): decode(v, t) for k, v in spec["__map__"]},
}


def decode(value: Any, tensors: Tensors) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    if isinstance(value, dict):
        tag = next((k for k in value if k in _TAGGED), None)
        if tag is not None:
            return _TAGGED[tag](value, tensors)
        return {k: decode(v, tensors) for k, v in value.items()}
    return value
