"""Frozen arrays stay home: a message names them by digest instead of carrying them.

With ``transfer.mode=head`` or ``last_k`` most of a pretrained CNN is frozen (the
``cameras`` default trains 1.07M of Lite0's 3.39M parameters; ``medical_dp`` only the
head), and the frozen arrays never change during a run: the round loop keeps them to
the bit (:func:`fedimg.serverapp.loop._keep_frozen`). Every client builds the same
pretrained model itself, so sending them each round and back moves the same bytes
again and again: 13.9 MB each way per camera, of which about 4.4 MB can change.

**Downlink.** :class:`Elision` (the server's :class:`~fedimg.transport.grid.Transport`)
leaves out of a message's model every frozen array that still equals the initial
model's, and adds a ConfigRecord (:data:`ELIDED_KEY`) with their names and a SHA-256
:func:`digest` of their values. A client fills them in from its own model
(:func:`restore`) after checking that its own values have that digest; a client
whose pretrained weights differ rejects the message, naming both digests, and never
trains on a trunk the server does not hold. A frozen array the run changed (the
ridge head when the head does not train) does not equal the initial one, so it
travels.

**Uplink.** A training reply leaves out every frozen array (an honest client returns
them unchanged, so they carry nothing); the server's ``decompress`` reply filter puts
the ones it sent back in before any check or strategy sees the reply.

The maths is unchanged: the client's model and the server's aggregate hold the same
values, to the bit, as when every array travelled. Only bytes change, and with them
the simulated link time of a device fleet (``hetero.*_mbps``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedimg.errors import UpdateError
from fedimg.transport.records import ARRAYS_KEY

ELIDED_KEY = "fedimg-elided"  # ConfigRecord {"keys": json list, "digest": hex}: of ARRAYS_KEY


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the arrays in key order: each key, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        arr = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr).cast("B") if arr.size else b"")
    return h.hexdigest()


class Elision:
    """The server's side: which frozen arrays a message may leave out, and their digest.

    ``reference`` holds the frozen arrays of the initial model, which every client
    builds for itself. The choice is made once per message content (a round's messages
    share one) and once per set of keys for the digest.
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self.reference = {k: np.asarray(v) for k, v in reference.items()}
        self._digests: dict[tuple[str, ...], str] = {}

    def elide(self, content: RecordDict) -> RecordDict:
        """A copy of ``content`` without the frozen model arrays that equal the initial
        model's (``content`` itself if none do)."""
        if ARRAYS_KEY not in content.array_records or not self.reference:
            return content
        record = content[ARRAYS_KEY]
        left_out = tuple(sorted(k for k in record.keys() if k in self.reference
                                and _equal(record[k].numpy(), self.reference[k])))
        if not left_out:
            return content
        if left_out not in self._digests:
            self._digests[left_out] = digest({k: self.reference[k] for k in left_out})
        dropped = set(left_out)
        out = RecordDict({k: v for k, v in content.items() if k != ARRAYS_KEY})
        out[ARRAYS_KEY] = ArrayRecord({k: v for k, v in record.items() if k not in dropped})
        out[ELIDED_KEY] = ConfigRecord({"keys": json.dumps(list(left_out)),
                                        "digest": self._digests[left_out]})
        return out


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def elided_keys(content: RecordDict) -> tuple[tuple[str, ...], str] | None:
    """The names and digest of the model arrays a message left out (None if it left
    nothing out); an UpdateError if the note is malformed."""
    note = content.config_records.get(ELIDED_KEY)
    if note is None:
        return None
    try:
        digest_hex = str(note["digest"])
        keys = json.loads(str(note["keys"]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise UpdateError(f"the message's '{ELIDED_KEY}' note is malformed: {exc}") from exc
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) \
            or len(set(keys)) != len(keys):
        raise UpdateError(f"the message's '{ELIDED_KEY}' keys are not a list of distinct "
                          "names")
    return tuple(keys), digest_hex


def restore(content: RecordDict,
            candidates: Callable[[tuple[str, ...]], Iterable[Mapping[str, np.ndarray]]],
            *, allowed: frozenset[str]) -> dict[str, np.ndarray] | None:
    """The full model arrays of ``content``: what it carries, plus what it left out,
    from the first of this client's ``candidates`` with the server's digest (None if
    the message carries no model).

    Only arrays this client never trains (``allowed``: its frozen keys) may be left
    out; an UpdateError names the difference and the fix otherwise.
    """
    note = elided_keys(content)
    if ARRAYS_KEY not in content.array_records:
        if note is not None:
            raise UpdateError("the message left model arrays out but carries no model")
        return None
    arrays = {k: v.numpy() for k, v in content[ARRAYS_KEY].items()}
    if note is None:
        return arrays
    keys, expected = note
    trained = sorted(set(keys) - allowed)
    if trained:
        raise UpdateError(f"the message left out '{trained[0]}' (and {len(trained) - 1} "
                          "more), which this client trains; only frozen arrays may stay home")
    present = sorted(set(keys) & set(arrays))
    if present:
        raise UpdateError(f"the message both carries and leaves out '{present[0]}'")
    found = []
    for mine in candidates(keys):
        found.append(digest(mine))
        if found[-1] == expected:
            arrays.update(mine)
            return arrays
    raise UpdateError(
        f"this client's frozen weights ({len(keys)} arrays) have digest "
        f"{' / '.join(f[:12] for f in found) or 'none'}, the server's {expected[:12]}: they "
        "were built from different pretrained weights. Fix: give every client and the "
        "server the same model and weights files, or set fl.elide_frozen=false to send "
        "every array")
