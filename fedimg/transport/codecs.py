"""Compression of client updates for the uplink (plain PyTorch and NumPy).

``compression.kind`` picks a codec from :data:`CODECS`; a client then sends, for
each parameter it trains, the compressed delta ``w_i - w_global`` instead of the
weights, and nothing for what it cannot change (frozen weights, frozen BatchNorm
statistics); other buffers travel as they are. The server rebuilds the update
(:func:`decompress_update`; the frozen arrays, as for every reply, from the model it
sent) before validating and aggregating it, so every strategy works unchanged.

* ``fp16``: half precision (2 bytes per value).
* ``int8``: symmetric per-tensor quantisation, scale = max|x| / 127 (1 byte per
  value plus one float), as in QSGD-style schemes (Alistarh et al. 2017).
* ``topk``: the ``compression.topk_fraction`` largest-magnitude entries of each
  tensor with their int32 indices (Aji & Heafield 2017; Lin et al. 2018, "Deep
  Gradient Compression").

With ``compression.error_feedback`` a client adds what it did not send last time
to this round's delta before compressing (Seide et al. 2014; Stich et al. 2018,
"Sparsified SGD with Memory"), so nothing is lost, only delayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedimg.errors import UpdateError
from fedimg.registry import Registry

Parts = dict[str, np.ndarray]
SEP = "::"  # "<state-dict key>::<part>" in the ArrayRecord of a compressed update


@dataclass(frozen=True)
class Codec:
    """Encodes one float tensor into named arrays and decodes them back."""

    description: str
    encode: Callable[[torch.Tensor, float], Parts]
    decode: Callable[[Parts, tuple[int, ...]], torch.Tensor]


def _int8_encode(x: torch.Tensor, _: float) -> Parts:
    peak = float(x.abs().max()) if x.numel() else 0.0
    scale = peak / 127 if peak > 0 else 1.0
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return {"q": q.numpy(), "s": np.array([scale], np.float32)}


def _topk_encode(x: torch.Tensor, fraction: float) -> Parts:
    flat = x.flatten()
    k = max(1, math.ceil(fraction * flat.numel())) if flat.numel() else 0
    index = torch.topk(flat.abs(), k).indices if k else torch.zeros(0, dtype=torch.long)
    return {"i": index.to(torch.int32).numpy(), "v": flat[index].numpy()}


def _topk_decode(parts: Parts, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(math.prod(shape), dtype=torch.float32)
    index = torch.from_numpy(parts["i"].astype(np.int64))
    if index.numel() and (index.min() < 0 or index.max() >= out.numel()):
        raise UpdateError("top-k update has indices outside its tensor")
    out[index] = torch.from_numpy(parts["v"].astype(np.float32))
    return out.reshape(shape)


CODECS: Registry[Codec] = Registry("compression", config_key="compression.kind")
CODECS.add("fp16", Codec(
    "half precision", encode=lambda x, _: {"h": x.to(torch.float16).numpy()},
    decode=lambda p, shape: torch.from_numpy(p["h"].astype(np.float32)).reshape(shape)))
CODECS.add("int8", Codec(
    "symmetric per-tensor int8", encode=_int8_encode,
    decode=lambda p, shape: (torch.from_numpy(p["q"].astype(np.float32))
                             * float(p["s"][0])).reshape(shape)))
CODECS.add("topk", Codec("largest-magnitude fraction with indices", encode=_topk_encode,
                         decode=_topk_decode))


def compress_update(codec_name: str, fraction: float, *,
                    global_state: Mapping[str, torch.Tensor],
                    local_state: Mapping[str, torch.Tensor], trained: frozenset[str],
                    frozen: frozenset[str], residual: dict[str, torch.Tensor] | None
                    ) -> tuple[Parts, dict[str, torch.Tensor]]:
    """The arrays a client sends, and its new error-feedback residual.

    ``residual`` is None without error feedback; otherwise it is updated with what
    compression dropped this round (and returned).
    """
    codec = CODECS.get(codec_name)
    out: Parts = {}
    memory: dict[str, torch.Tensor] = {}
    for key, value in local_state.items():
        if key in frozen:
            continue
        if key not in trained:
            out[key] = value.detach().cpu().numpy()
            continue
        delta = value.detach().cpu().float() - global_state[key].detach().cpu().float()
        if residual is not None:
            delta = delta + residual.get(key, torch.zeros_like(delta))
        parts = codec.encode(delta, fraction)
        memory[key] = delta - codec.decode(parts, tuple(delta.shape))
        out.update({f"{key}{SEP}{name}": array for name, array in parts.items()})
    return out, memory if residual is not None else {}


def decompress_update(codec_name: str, arrays: Mapping[str, np.ndarray],
                      global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state a compressed update stands for: global + delta; the frozen arrays it
    left out are put back by the server's ``frozen_home`` reply filter, as for any reply."""
    codec = CODECS.get(codec_name)
    grouped: dict[str, Parts] = {}
    full: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        key, sep, part = name.partition(SEP)
        if sep:
            grouped.setdefault(key, {})[part] = array
        else:
            full[key] = array
    for key, parts in grouped.items():
        if key not in global_arrays:
            raise UpdateError(f"compressed update has unknown key '{key}'")
        start = global_arrays[key]
        try:
            delta = codec.decode(parts, tuple(start.shape)).numpy()
        except (KeyError, RuntimeError, ValueError) as exc:
            raise UpdateError(f"compressed update of '{key}' is malformed: {exc}") from exc
        full[key] = (start.astype(np.float32) + delta).astype(start.dtype)
    return full
