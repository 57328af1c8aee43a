"""Packed transport: a message's model arrays travel as one byte buffer.

Flower 1.41 moves every :class:`~flwr.app.Array` of a message as a separate object
(plus its chunks) through the SuperLink, each with its own HTTP round trips and
state-database bookkeeping. EfficientNet-Lite0's 296 state-dict entries become
166 objects per message, and on this machine moving them through a TLS SuperLink
took about 20 s per message (BENCHMARKS.md §8), for 13.7 MB.

Packing concatenates the raw bytes of every array into one uint8 array and
records the layout (key, dtype, shape, offset) in a ConfigRecord; the message then
holds about six objects. It changes nothing else: the bytes are the same, the
strategies see ordinary ArrayRecords (the server's ``unpack`` reply filter unpacks
replies before they reach them, the ClientApp unpacks what it receives), and the
unpacked arrays are bit-identical to the ones packed.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedimg.errors import UpdateError

PACKED_ARRAYS_KEY = "fedimg-packed"  # ArrayRecord {"bytes": uint8 buffer}
LAYOUT_KEY = "fedimg-packed-layout"  # ConfigRecord {"record": ..., "json": [[key, dtype, shape]]}
_BUFFER = "bytes"


def pack_arrays(record: ArrayRecord) -> tuple[ArrayRecord, list[list[object]]]:
    """One uint8 Array holding every array of ``record`` back to back, and the layout."""
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    arrays = [(key, np.asarray(value.numpy(), order="C")) for key, value in record.items()]
    layout = [[key, arr.dtype.str, list(arr.shape)] for key, arr in arrays]
    buffer = (np.concatenate([arr.reshape(-1).view(np.uint8) for _, arr in arrays])
              if arrays else np.zeros(0, dtype=np.uint8))
    return ArrayRecord({_BUFFER: Array(buffer)}), layout


def unpack_arrays(packed: ArrayRecord, layout: list[list[object]]) -> ArrayRecord:
    """Inverse of :func:`pack_arrays`; a layout that does not fit the buffer is an UpdateError."""
    if _BUFFER not in packed:
        raise UpdateError(f"packed arrays carry no '{_BUFFER}' buffer")
    buffer = packed[_BUFFER].numpy()
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise UpdateError(f"packed buffer must be 1-D uint8, got {buffer.dtype} {buffer.shape}")
    out: dict[str, Array] = {}
    offset = 0
    for entry in layout:
        key, dtype, shape = _layout_entry(entry)
        end = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end > buffer.size:
            raise UpdateError(f"packed layout overruns the buffer at '{key}' "
                              f"({end} > {buffer.size} bytes)")
        out[key] = Array(buffer[offset:end].view(dtype).reshape(shape))
        offset = end
    if offset != buffer.size:
        raise UpdateError(f"packed buffer holds {buffer.size} bytes, its layout {offset}")
    return ArrayRecord(out)


def _layout_entry(entry: object) -> tuple[str, np.dtype, list[int]]:
    """One ``[key, dtype, shape]`` layout entry, checked; UpdateError if malformed."""
    try:
        key, dtype_str, shape = entry  # type: ignore[misc]
        dtype = np.dtype(str(dtype_str))
        dims = [int(d) for d in shape]
    except (TypeError, ValueError) as exc:
        raise UpdateError(f"packed layout entry {str(entry)[:80]} is malformed: {exc}") from exc
    if dtype.kind not in "biuf" or any(d < 0 for d in dims):
        raise UpdateError(f"packed layout entry {str(entry)[:80]}: need a numeric dtype and "
                          "non-negative dimensions")
    return str(key), dtype, dims


def pack_content(content: RecordDict, key: str) -> RecordDict:
    """A copy of ``content`` whose ArrayRecord ``key`` is packed (as is, if it has none)."""
    if key not in content.array_records:
        return content
    packed, layout = pack_arrays(content[key])
    out = RecordDict({k: v for k, v in content.items() if k != key})
    out[PACKED_ARRAYS_KEY] = packed
    out[LAYOUT_KEY] = ConfigRecord({"record": key, "json": json.dumps(layout)})
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """``content`` with its packed arrays restored under their own key (as is if unpacked)."""
    if PACKED_ARRAYS_KEY not in content.array_records:
        return content
    if LAYOUT_KEY not in content.config_records:
        raise UpdateError("packed arrays arrived without their layout")
    info = content[LAYOUT_KEY]
    try:
        layout = json.loads(str(info["json"]))
        record = str(info["record"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise UpdateError(f"packed layout is malformed: {exc}") from exc
    if not isinstance(layout, list):
        raise UpdateError("packed layout is not a list of [key, dtype, shape] entries")
    out = RecordDict({k: v for k, v in content.items()
                      if k not in (PACKED_ARRAYS_KEY, LAYOUT_KEY)})
    out[record] = unpack_arrays(content[PACKED_ARRAYS_KEY], layout)
    return out
