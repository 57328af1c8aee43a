"""What a privacy mode reads from a client and what it hands back.

:mod:`fedimg.privacy` sits below :mod:`fedimg.clientapp`: the clientapp's
``TaskEnvironment`` satisfies :class:`ClientEnvironment` without either package
importing the other (PEP 544 protocols are checked by shape, not by inheritance).
Every member listed there is used by a privacy mode, and nothing else is. A mode's
round returns a :class:`ClientRound`. This module imports nothing heavy, so the
mechanisms (:mod:`~fedimg.privacy.dp_sgd`) and the mode registry
(:mod:`fedimg.privacy`) can both import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from fedimg.config import FedimgConfig
    from fedimg.data import ClientPartition, Dataset, InMemoryLoader


@dataclass
class ClientRound:
    """What one client's training round produced (before it becomes a Flower reply)."""

    metrics: dict[str, float]
    num_examples: int
    ledger: dict[str, Any] | None = None  # DP state the client keeps for its next round
    declined: str = ""  # why the client refused to train (its privacy budget), or ""


class ClientLoaders(Protocol):
    """One client's training data as DP-SGD reads it."""

    @property
    def train(self) -> InMemoryLoader:
        """The client's training loader (DP-SGD draws its Poisson batches from its rows)."""
        ...

    @property
    def num_train(self) -> int:
        """The client's number of training samples N (q = B / N)."""
        ...


class ClientEnvironment(Protocol):
    """The run's data, partitions and shared model in one worker process.

    ``train`` is the non-private round (``privacy.mode=none`` and ``client_dp``); the
    other members are what DP-SGD reads to calibrate, check and run a private round.
    """

    @property
    def cfg(self) -> FedimgConfig:
        """The resolved run config."""
        ...

    @property
    def dataset(self) -> Dataset:
        """The pooled dataset; ``dataset.train.labels`` gives a client's true labels."""
        ...

    @property
    def partitions(self) -> Sequence[ClientPartition]:
        """One partition per client: its ``train_indices`` into ``dataset.train``."""
        ...

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        ...

    @property
    def device(self) -> torch.device:
        """Where training runs."""
        ...

    def client(self, partition_id: int) -> ClientLoaders:
        """The loaders of client ``partition_id``."""
        ...

    def private_model(self) -> torch.nn.Module:
        """The shared model with in-place operations rewritten (for Opacus' hooks)."""
        ...

    def private_inputs(self, partition_id: int) -> tuple[torch.nn.Module, InMemoryLoader]:
        """The module DP-SGD wraps and the loader it samples: :meth:`private_model` and the
        client's images, or its trainable tail and cached trunk features (issue 16)."""
        ...

    def train(self, partition_id: int, *, server_round: int, proximal_mu: float = 0.0,
              grad_offset: Mapping[str, Any] | None = None) -> tuple[dict[str, float], int]:
        """A non-private local round from the loaded weights: (metrics, num_examples)."""
        ...
