"""How many optimizer steps a client takes in one round: ``train.local_budget``.

With ``local_epochs`` passes per round, a site of ``n_i`` samples takes
``tau_i = E * ceil(n_i / B)`` steps, so a 440-image site steps 14 times per round at
batch 32 and a 16-image site once. FedAvg then converges to a stationary point of a
*different* objective, weighted towards the sites that step most: the objective
inconsistency of Wang et al. 2020 ("Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS; FedNova). A budget fixes each
client's ``tau_i``:

* ``epochs`` (the default): ``local_epochs * len(loader)``, or exactly ``local_steps``
  when that is set; today's behaviour, unchanged.
* ``steps``: exactly ``local_steps`` for every client, cycling through its data; equal
  work per site (the fixed-``tau`` setting of Wang et al. 2020 and of most analyses of
  local SGD, e.g. Stich 2019, "Local SGD Converges Fast and Communicates Little").
* ``steps_per_sample``: ``max(1, ceil(s * n_i))`` with ``s = train.steps_per_sample``;
  work proportional to data, in steps rather than whole epochs and independent of the
  batch size. At batch ``B``, ``s = 1 / B`` is about one epoch (``ceil(n_i / B)``) and
  ``s = E / B`` is FedNova's ``tau_i = E n_i / B`` with a real-valued ``E``.

A caller that sets ``local_steps`` on a copy of the config (a client dropping
mid-round, personalization's k steps, DP-SGD's planned steps) gets exactly that
number under every budget.
"""

from __future__ import annotations

import math

from fedimg.config import TrainConfig

LOCAL_BUDGETS = ("epochs", "steps", "steps_per_sample")  # = fedimg.config.LocalBudget


def round_steps(cfg: TrainConfig, *, batches: int, num_samples: int) -> int:
    """Optimizer steps of one round for a client of ``num_samples`` training samples.

    ``batches``: the batches of one pass over its data (``len(loader)``, or DP-SGD's
    expected 1/q), which the ``epochs`` budget multiplies by ``local_epochs``.
    """
    if cfg.local_steps is not None:  # budget `steps`, `epochs` with steps, or a caller's
        return cfg.local_steps
    if cfg.local_budget == "steps_per_sample":
        if cfg.steps_per_sample is None:
            raise ValueError("train.local_budget=steps_per_sample needs train.steps_per_sample")
        # round to 9 decimals first: 0.05 * 100 is 5.000000000000001 in floating point
        return max(1, math.ceil(round(cfg.steps_per_sample * num_samples, 9)))
    return cfg.local_epochs * batches
