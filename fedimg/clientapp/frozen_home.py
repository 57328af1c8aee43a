"""Where a client finds the frozen arrays a message left out (:mod:`fedimg.transport.elision`).

Two places, tried in order until one has the server's digest:

1. its model as it is: every message after the first, whose frozen arrays it filled
   in (or received) before and training never changes;
2. the model as the server builds its start: the same model under the run's seed, with
   the weights the config names (ImageNet's, or none). A worker's environment starts
   without weights (every message used to carry them), so its first lean message
   builds them, once per environment.

A deployed site does not read a weights *file* the server names: it holds its own
pretrained model or rejects the message (the error names ``fl.elide_frozen=false``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from fedimg.clientapp.environment import TaskEnvironment
from fedimg.errors import FedimgError

log = logging.getLogger(__name__)

KEYWORD_WEIGHTS = ("pretrained", "none")  # built from the package, not from a path


def frozen_candidates(env: TaskEnvironment, keys: tuple[str, ...], *, site: bool
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Copies of ``keys`` from the places above, the cheaper first."""
    state = env.model.state_dict()
    yield {k: state[k].detach().cpu().numpy().copy() for k in keys}
    if site and env.cfg.weights not in KEYWORD_WEIGHTS:
        return
    try:
        built = env.built_state
    except (FedimgError, OSError, RuntimeError) as exc:  # e.g. weights it cannot fetch here
        log.warning("frozen arrays left out of a message: this client cannot build the "
                    "configured weights (%s)", exc)
        return
    yield {k: built[k].cpu().numpy().copy() for k in keys}


def home_keys(env: TaskEnvironment) -> frozenset[str]:
    """What a training reply leaves out: the frozen arrays (unless ``fl.elide_frozen=false``)."""
    return env.frozen_keys if env.cfg.fl.elide_frozen else frozenset()
