"""Differential privacy for fedimg: the privacy-mode registry and shared types.

``privacy.mode`` picks one entry of :data:`PRIVACY_MODES`:

* ``none``: plain federated training.
* ``dp_sgd``: sample-level DP-SGD at every client (Abadi et al. 2016, "Deep
  Learning with Differential Privacy", CCS) with Opacus; see :mod:`fedimg.privacy.dp_sgd`.
* ``client_dp``: client-level central DP at the server, DP-FedAvg (McMahan et al.
  2018, "Learning Differentially Private Recurrent Language Models", ICLR), using
  Flower's server-side clipping wrappers; see :mod:`fedimg.privacy.client_dp`.
* ``distributed_dp``: the same client-level guarantee without trusting the server with
  the noise: each client clips and adds its share of discrete Gaussian noise under
  secure aggregation (Kairouz et al. 2021); see :mod:`fedimg.privacy.distributed_dp`.

An entry says how a client trains one round and how the server wraps its strategy,
so no code branches on the mode's name. The heavy imports (Opacus, Flower) happen
only when a mode is used. A mode's ``train`` gets the client's environment typed as
:class:`~fedimg.privacy.protocols.ClientEnvironment`: privacy never imports clientapp.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedimg.privacy.protocols import ClientRound
from fedimg.registry import Registry

if TYPE_CHECKING:
    from fedimg.config import FedimgConfig
    from fedimg.privacy.protocols import ClientEnvironment


ClientTrain = Callable[..., ClientRound]
StrategyWrapper = Callable[[Any, "FedimgConfig", frozenset[str]], Any]


@dataclass(frozen=True)
class PrivacyMode:
    """A privacy mode: the client's round and the server's strategy wrapper."""

    description: str
    train: ClientTrain
    wrap_strategy: StrategyWrapper | None = None
    secret_sampling: bool = False  # client sampling is part of the mechanism (amplification)
    clips_updates: bool = False  # the server clips every update (no norm-based rejection)
    adopt_ledger: Callable[..., dict[str, Any]] | None = None  # check a handed-back ledger
    private_training: bool = False  # local training is the mechanism: no other use of the data
    needs_every_reply: bool = False  # the aggregate is released only if every sampled client replies
    needs_secure_sum: bool = False  # only under fl.secure_aggregation (the clients add the noise)
    inspects_updates: bool = False  # the server must see each update (refused under SecAgg)


PRIVACY_MODES: Registry[PrivacyMode] = Registry("privacy mode", config_key="privacy.mode")


def plain_train(env: ClientEnvironment, partition_id: int, *, server_round: int,
                proximal_mu: float = 0.0, ledger: dict[str, Any] | None = None,
                admit: Callable[[dict[str, Any]], str] | None = None,
                grad_offset: Mapping[str, Any] | None = None) -> ClientRound:
    """A non-private local round (also the client's part of client-level DP)."""
    metrics, num_examples = env.train(partition_id, server_round=server_round,
                                      proximal_mu=proximal_mu, grad_offset=grad_offset)
    return ClientRound(metrics=metrics, num_examples=num_examples)


def _dp_sgd_train(env: ClientEnvironment, partition_id: int, **kwargs: Any) -> ClientRound:
    from fedimg.privacy.dp_sgd import train_round

    return train_round(env, partition_id, **kwargs)


def _dp_sgd_adopt(env: ClientEnvironment, partition_id: int, offered: dict[str, Any]
                  ) -> dict[str, Any]:
    from fedimg.privacy.dp_budget import adopted_ledger

    return adopted_ledger(env, partition_id, offered)


def _client_dp_wrapper(strategy: Any, cfg: FedimgConfig, buffer_keys: frozenset[str]) -> Any:
    from fedimg.privacy.client_dp import wrap_client_dp

    return wrap_client_dp(strategy, cfg, buffer_keys)


def _distributed_dp_wrapper(strategy: Any, cfg: FedimgConfig,
                            buffer_keys: frozenset[str]) -> Any:
    from fedimg.privacy.distributed_dp import wrap_distributed_dp

    return wrap_distributed_dp(strategy, cfg, buffer_keys)


PRIVACY_MODES.add("none", PrivacyMode("no differential privacy", train=plain_train))
PRIVACY_MODES.add("dp_sgd", PrivacyMode(
    "sample-level DP-SGD at every client (Opacus)", train=_dp_sgd_train,
    adopt_ledger=_dp_sgd_adopt, private_training=True))
PRIVACY_MODES.add("client_dp", PrivacyMode(
    "client-level central DP at the server (DP-FedAvg)", train=plain_train,
    wrap_strategy=_client_dp_wrapper, secret_sampling=True, clips_updates=True,
    needs_every_reply=True, inspects_updates=True))
PRIVACY_MODES.add("distributed_dp", PrivacyMode(
    "client-level DP, noised by the clients under secure aggregation", train=plain_train,
    wrap_strategy=_distributed_dp_wrapper, secret_sampling=True, clips_updates=True,
    needs_secure_sum=True))
