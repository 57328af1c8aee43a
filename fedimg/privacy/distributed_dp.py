"""Distributed DP under secure aggregation: each client noises its share, the server sums.

The distributed discrete Gaussian (Kairouz, Liu and Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", ICML):

1. each client clips its update w_i - w_global to L2 norm C (``privacy.clipping_norm``);
2. scales it to integers (``K`` levels per C, :class:`~fedimg.privacy.secagg.SecAggPlan`)
   with unbiased stochastic rounding, so its integer L2 norm is at most K + sqrt(d);
3. adds discrete Gaussian noise N_Z(0, s^2) per coordinate, s = sigma (K + sqrt(d)) /
   sqrt(h), drawn from a ChaCha20 stream (:mod:`fedimg.privacy.secure_noise`), and
   masks the result (SecAgg+). h = ceil((1 - rho) m) of the m sampled clients are
   assumed honest and present, rho = ``privacy.dropout_tolerance``.

The server unmasks only the sum. With at least h honest contributors it carries
discrete Gaussian noise of variance >= sigma^2 (K + sqrt(d))^2 on a sum of sensitivity
K + sqrt(d): the noise multiplier sigma that client-level DP (DP-FedAvg) calibrates,
accounted by the same ledger (:func:`fedimg.privacy.client_dp.client_level_ledger`: one
subsampled release per round at q = m / N). Two approximations are reported: a sum of
discrete Gaussians is not exactly one, off by tau (Kairouz et al., Theorem 1; reported
as ``dp/ddg_tau``, negligible for s >> 1), and the Gaussian accountant is used for the
discrete Gaussian, whose Renyi DP is at most the continuous one's (Canonne, Kamath and
Steinke 2020, "The Discrete Gaussian for Differential Privacy", NeurIPS).

Threat model: the server follows the protocol's dropout handling but is curious; up
to rho m clients may drop out or collude with it (omitting their noise); the remaining
h honest clients' noise alone gives the accounted epsilon. A client refuses to unmask
when fewer than ``threshold`` of its neighbours (>= (1 - rho) of them) survived.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedimg.config import FedimgConfig, from_json, to_json
from fedimg.privacy.client_dp import (
    client_level_ledger,
    refuse_if_spent,
    release_report,
    sampled_clients,
)
from fedimg.privacy.secagg import SecAggPlan, make_plan, stochastic_round
from fedimg.privacy.secure_noise import ChaChaStream

log = logging.getLogger(__name__)


def honest_clients(sampled: int, tolerance: float) -> int:
    """h = ceil((1 - rho) m): contributors whose noise alone must suffice."""
    return max(1, math.ceil((1 - tolerance) * sampled - 1e-9))


def discrete_gaussian(std: float, n: int, stream: ChaChaStream) -> np.ndarray:
    """``n`` draws of N_Z(0, std^2) on the integers, int64 (Canonne et al. 2020, Alg. 3).

    A discrete Laplace candidate Y (scale t = floor(std) + 1, the difference of two
    geometrics) is accepted with probability exp(-(|Y| - std^2/t)^2 / (2 std^2)),
    vectorised: rejected positions are redrawn. The exponentials are floating point
    (the paper's exact sampler uses only integers), so this is the usual approximation.
    """
    out = np.zeros(n, dtype=np.int64)
    if std <= 0 or n == 0:
        return out
    t = math.floor(std) + 1
    todo = np.arange(n)
    while todo.size:
        m = todo.size
        u = stream.uniform(3 * m)
        geometric = np.floor(-t * np.log(u[: 2 * m])).astype(np.int64)  # Geom(1 - e^(-1/t))
        y = geometric[:m] - geometric[m:]
        accept = u[2 * m:] < np.exp(-((np.abs(y) - std * std / t) ** 2) / (2 * std * std))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


def ddg_tau(std: float, contributors: int) -> float:
    """Kairouz et al.'s tau: how far a sum of ``contributors`` N_Z(0, std^2) is from one."""
    return 10 * sum(math.exp(-2 * math.pi ** 2 * std ** 2 * k / (k + 1))
                    for k in range(1, contributors))


def noisy_body(update: np.ndarray, plan: SecAggPlan, stream: ChaChaStream) -> np.ndarray:
    """Steps 1-3 of the mechanism: clipped, rounded, noised integer update, int64 (d,)."""
    norm = float(np.linalg.norm(update))
    clipped = update * min(1.0, plan.clip / norm) if norm > 0 else update
    rounded = stochastic_round(clipped / plan.step, stream)  # |.| <= K = clip / step
    return rounded + discrete_gaussian(plan.noise_std, rounded.size, stream)


class AccountedSecureSum(Strategy):
    """The server's side of distributed DP: the budget, one accounted release per round.

    Clipping and noise happen at the clients; this wrapper only refuses a round whose
    release would exceed the budget and records each release in the client-level
    ledger (the same accountant as ``client_dp``). Everything else is the wrapped
    strategy's (FedAvg over the secure sum).
    """

    def __init__(self, strategy: Strategy, cfg: FedimgConfig) -> None:
        self.strategy = strategy
        self.ledger = client_level_ledger(cfg)
        self.clipping_norm = cfg.privacy.clipping_norm
        self.tolerance = cfg.privacy.dropout_tolerance
        self.sampled = sampled_clients(cfg)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        refuse_if_spent(self.ledger, server_round)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.ledger.record(1)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(self, *args: Any, **kwargs: Any) -> Any:  # fedimg's loop drives the rounds
        raise NotImplementedError("fedimg's RoundLoop drives the rounds")

    def privacy_report(self) -> dict[str, float]:
        """Server-side privacy metrics (``dp/*``) for the round record."""
        return {**release_report(self.ledger, self.clipping_norm),
                "dp/honest_clients": float(honest_clients(self.sampled, self.tolerance))}


def wrap_distributed_dp(strategy: Strategy, cfg: FedimgConfig,
                        buffer_keys: frozenset[str] = frozenset()) -> Strategy:
    """``strategy`` with the client-level ledger; the clients noise (see the module)."""
    wrapped = AccountedSecureSum(strategy, cfg)
    book = wrapped.ledger
    log.info("distributed DP: sigma=%.4f, C=%g, q=%d/%d, delta=%.2e, budget eps=%g over %d "
             "rounds; the noise holds with up to %.0f%% of the sampled clients dropped or "
             "colluding", book.noise_multiplier, cfg.privacy.clipping_norm, wrapped.sampled,
             cfg.clients, book.delta, cfg.privacy.target_epsilon, cfg.rounds,
             100 * cfg.privacy.dropout_tolerance)
    return wrapped


@functools.lru_cache(maxsize=8)
def _sigma(config_json: str) -> float:
    """The client-level ledger's sigma, calibrated once per run config (not every round)."""
    return client_level_ledger(from_json(config_json)).noise_multiplier


def round_plan(cfg: FedimgConfig, *, sampled: int, dim: int, max_weight: int) -> SecAggPlan:
    """The SecAgg+ plan of one round of ``cfg`` (the server's, and each client's check).

    Without distributed DP every coordinate of a weighted update is kept within
    ``secagg.clip_range``; with it, the clip is the L2 norm ``privacy.clipping_norm``
    (so each coordinate is within it too), every weight is 1, and the noise follows
    the client-level ledger's sigma.
    """
    s, p = cfg.secagg, cfg.privacy
    dp = p.mode == "distributed_dp"
    sigma = _sigma(to_json(cfg)) if dp else 0.0
    return make_plan(sampled=sampled, shares=s.shares, threshold=s.threshold,
                     modulus_bits=s.modulus_bits, clip=p.clipping_norm if dp else s.clip_range,
                     dim=dim, max_weight=1 if dp else max_weight, noise_multiplier=sigma,
                     tolerance=p.dropout_tolerance if dp else 0.0)
