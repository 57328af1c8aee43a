"""Seeds derived from the run seed and a key, so that a draw depends on what it is for.

Every random stream of a run is keyed by what it is for (the run seed, a stream tag,
the round, the client), never by call order: which worker serves a client varies
between runs, and a resumed run must replay the same batches, devices and noise.
NumPy's ``SeedSequence`` mixes the keys (O'Neill 2015, PCG's seeding scheme).
"""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 32-bit seed for ``torch.manual_seed`` or a torch Generator, from ``keys``."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def derive_rng(*keys: int) -> np.random.Generator:
    """A NumPy generator seeded by ``keys`` (the same keys give the same stream)."""
    return np.random.default_rng([int(k) for k in keys])
