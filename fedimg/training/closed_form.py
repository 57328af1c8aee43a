"""A classification head in closed form from feature statistics (plain PyTorch).

Fed3R (Fanì, Camoriano, Caputo and Ciccone 2024, "Accelerating Heterogeneous
Federated Learning with Closed-form Classifiers", ICML) fits the last linear layer
of a pretrained network by ridge regression on one-hot targets. Each client sends
the sums over its own images of

    G_k = sum phi phi^T    (D+1, D+1)      M_k = sum phi y^T    (D+1, K)

where ``phi`` is the head's input feature with a constant 1 appended (the bias) and
``y`` the one-hot label. Sums add up: the server's ``sum_k G_k`` and ``sum_k M_k``
are exactly what pooling every client's images would give, so the solution

    W = (G + lambda I)^-1 M

is the same however the images are spread over clients, even when each client holds
one class (where gradient-based FedAvg fails). ``lambda`` is given relative to the
mean diagonal of ``G``, so one setting suits any dataset size and feature scale.

* :func:`head_statistics`: one client's ``(G_k, M_k, n_k)`` through ``model``,
  captured at the input of its ``head`` (eval mode, no augmentation);
* :func:`ridge_head`: the head's weight (K, D) and bias (K,) from summed statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class HeadStatistics:
    """Feature sums of some images: Gram (D+1, D+1), moment (D+1, K), count, float64."""

    gram: torch.Tensor
    moment: torch.Tensor
    count: int

    def __add__(self, other: HeadStatistics) -> HeadStatistics:
        return HeadStatistics(self.gram + other.gram, self.moment + other.moment,
                              self.count + other.count)


def head_statistics(model: nn.Module, head: nn.Linear, batches: Iterable[Batch], *,
                    num_classes: int, device: torch.device) -> HeadStatistics:
    """``(G, M, n)`` of ``batches`` at the input of ``head`` (a layer of ``model``).

    The model runs in eval mode (BatchNorm statistics, no dropout), as at test time;
    its train/eval mode is restored afterwards.
    """
    dim = head.in_features + 1
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    moment = torch.zeros(dim, num_classes, dtype=torch.float64, device=device)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    was_training, count = model.training, 0
    model.to(device).eval()
    try:
        with torch.inference_mode():
            for x, y in batches:
                seen.clear()
                model(x.to(device))
                phi = seen[-1].reshape(len(y), -1).double()  # (B, D)
                phi = torch.cat([phi, phi.new_ones(len(y), 1)], dim=1)  # (B, D+1)
                gram += phi.T @ phi
                moment += phi.T @ F.one_hot(y.to(device), num_classes).double()
                count += len(y)
    finally:
        handle.remove()
        model.train(was_training)
    return HeadStatistics(gram.cpu(), moment.cpu(), count)


def ridge_head(stats: HeadStatistics, *, relative_lambda: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (K, D) and bias (K,) minimising ``||Phi W - Y||^2 + lambda ||W||^2``.

    ``lambda = relative_lambda * trace(G) / (D+1)``. Solved in float64 by Cholesky;
    returned as float32.
    """
    gram, dim = stats.gram.double(), stats.gram.shape[0]
    penalty = relative_lambda * torch.diagonal(gram).mean().clamp_min(1e-12)
    factor = torch.linalg.cholesky(gram + penalty * torch.eye(dim, dtype=torch.float64))
    solution = torch.cholesky_solve(stats.moment.double(), factor)  # (D+1, K)
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()
