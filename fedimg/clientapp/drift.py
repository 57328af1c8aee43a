"""A training message's gradient offset (SCAFFOLD, FedDyn), read and checked for the handler.

SCAFFOLD (Karimireddy et al. 2020) corrects each local gradient by ``c - c_i``; FedDyn
(Acar et al. 2021) adds ``-grad L_k(x_k^{t-1})``. Both offsets are computed by the
server, which keeps the per-client state (:mod:`fedimg.serverapp.drift_strategies`), and
travel in the message under :data:`~fedimg.transport.records.GRAD_OFFSET_KEY`: the
client keeps nothing between rounds for them (not in ``context.state``, not on a site's
disk), so a lost or restarted client cannot drift out of step with the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedimg.errors import UpdateError
from fedimg.transport.records import GRAD_OFFSET_KEY


def grad_offset(array_records: Mapping[str, Any], *, trained: frozenset[str],
                reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The offset a message carries (its ``content.array_records``), one float32 tensor
    per trained parameter, or None.

    Only trained parameters may have one (no frozen weight, no BatchNorm statistic),
    each of its parameter's shape and finite; anything else fails the round's message.
    """
    record = array_records.get(GRAD_OFFSET_KEY)
    if record is None:
        return None
    offsets = {}
    for key, array in record.items():
        value = np.asarray(array.numpy())
        if key not in trained:
            raise UpdateError(f"the server's gradient offset names '{key}', which this "
                              "client does not train")
        if tuple(value.shape) != tuple(reference[key].shape) or value.dtype.kind != "f" \
                or not np.isfinite(value).all():
            raise UpdateError(f"the server's gradient offset for '{key}' is not a finite "
                              f"float array of shape {tuple(reference[key].shape)}")
        offsets[key] = torch.from_numpy(value.astype(np.float32))
    return offsets
