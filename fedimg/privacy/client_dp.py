"""Client-level central DP at the server: Flower's DP wrappers plus an accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models", ICLR): the server clips each client's update to L2 norm C, averages the
clipped updates with equal weights, and adds Gaussian noise N(0, (sigma C / m)^2) for
m sampled clients. Clipping and noise are Flower's own
``DifferentialPrivacyServerSideFixedClipping`` and, with ``privacy.clipping=adaptive``,
``DifferentialPrivacyServerSideAdaptiveClipping`` (Andrew et al. 2021,
"Differentially Private Learning with Adaptive Clipping", NeurIPS), whose sigma is
already the effective one after the noisy clipped-count query.

Flower's own accountant refuses client subsampling, so the accounting here uses
Opacus' accountants through a :class:`~fedimg.privacy.accounting.PrivacyLedger`:
one subsampled Gaussian step per round with q = m / n. Flower samples m clients
uniformly without replacement while the accountants assume Poisson sampling; this is
the usual approximation (exact when every client trains, q = 1). Sigma is calibrated
once for all rounds, and the strategy raises PrivacyBudgetExhausted before a round
whose release would exceed the budget. Metrics, and evaluation, are not covered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedimg.config import FedimgConfig
from fedimg.errors import ConfigError, PrivacyBudgetExhausted
from fedimg.privacy.accounting import PrivacyLedger, default_delta, new_ledger
from fedimg.registry import Registry

log = logging.getLogger(__name__)

UNIFORM_KEY = "dp-uniform-weight"  # every client weighs 1: sample counts would leak

CLIPPING: Registry[type] = Registry("client-level clipping", config_key="privacy.clipping")
CLIPPING.add("fixed", DifferentialPrivacyServerSideFixedClipping)
CLIPPING.add("adaptive", DifferentialPrivacyServerSideAdaptiveClipping)


class AccountedClientDP:
    """Mixin over a Flower DP wrapper: budget check, equal weights, epsilon per round."""

    ledger: PrivacyLedger
    strategy: Strategy
    clipping_norm: float
    buffer_keys: frozenset[str] = frozenset()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's configure_train, unless the next release would exceed the budget."""
        refuse_if_spent(self.ledger, server_round)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average with equal weights and noise (Flower); account one release.

        The noise sigma C / m is calibrated for m updates: with fewer usable replies
        the average would be too sensitive, so nothing is released that round.
        """
        replies = _uniform_weights(replies)
        usable = sum(not r.has_error() for r in replies)
        if usable < self.num_sampled_clients:  # type: ignore[attr-defined]
            log.warning("round %d: %d of %d sampled clients replied; client-level DP releases "
                        "no aggregate this round (its noise is sized for %d)", server_round,
                        usable, self.num_sampled_clients, self.num_sampled_clients)  # type: ignore[attr-defined]
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:  # a noisy aggregate was released
            self.ledger.record(1)
            # Frozen weights and BatchNorm buffers are public (pretrained) and never change
            # at the clients; Flower noised them too (a running variance can turn negative).
            current = self.current_arrays  # type: ignore[attr-defined]
            for key in self.buffer_keys & set(arrays.keys()):
                arrays[key] = current[key]
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Flower's aggregate_evaluate with the equal weights training uses."""
        return super().aggregate_evaluate(  # type: ignore[misc]
            server_round, _uniform_weights(replies))

    def privacy_report(self) -> dict[str, float]:
        """Server-side privacy metrics for the round record (``dp/*``)."""
        return release_report(self.ledger, self.clipping_norm)


def refuse_if_spent(ledger: PrivacyLedger, server_round: int) -> None:
    """PrivacyBudgetExhausted before a round whose release would exceed the budget."""
    if ledger.would_exceed(1):
        raise PrivacyBudgetExhausted(
            f"round {server_round}: client-level epsilon would reach "
            f"{ledger.epsilon_after(1):.3f} > budget {ledger.target_epsilon:g} "
            f"(spent {ledger.spent():.3f}); stopping")


def release_report(ledger: PrivacyLedger, clipping_norm: float) -> dict[str, float]:
    """A client-level ledger's ``dp/*`` metrics for the round record."""
    return {"dp/epsilon": ledger.spent(),
            f"dp/epsilon_{ledger.cross_check()}": ledger.spent(ledger.cross_check()),
            "dp/delta": ledger.delta, "dp/sigma": ledger.noise_multiplier,
            "dp/sample_rate": ledger.sample_rate, "dp/target_epsilon": ledger.target_epsilon,
            "dp/releases": float(ledger.steps), "dp/clipping_norm": float(clipping_norm)}


def _uniform_weights(replies: Iterable[Message]) -> list[Message]:
    """The replies with weight 1 each under :data:`UNIFORM_KEY` (the strategy's weighting key)."""
    replies = list(replies)
    for reply in replies:
        if not reply.has_error():
            for record in reply.content.metric_records.values():
                record[UNIFORM_KEY] = 1
    return replies


def sampled_clients(cfg: FedimgConfig) -> int:
    """Clients Flower samples per training round (as FedAvg.configure_train computes it)."""
    return min(cfg.clients, max(int(cfg.clients * cfg.fl.fraction_train),
                                cfg.fl.min_train_clients))


def client_level_ledger(cfg: FedimgConfig) -> PrivacyLedger:
    """The server's ledger: q = m / n, one release per round, sigma calibrated for all rounds."""
    p = cfg.privacy
    return new_ledger(target_epsilon=p.target_epsilon,
                      delta=p.target_delta or default_delta(cfg.clients),
                      sample_rate=sampled_clients(cfg) / cfg.clients, planned_steps=cfg.rounds,
                      accountant=p.accountant, noise_multiplier=p.noise_multiplier)


def wrap_client_dp(strategy: Strategy, cfg: FedimgConfig,
                   buffer_keys: frozenset[str] = frozenset()) -> Strategy:
    """``strategy`` inside Flower's server-side DP wrapper named by ``privacy.clipping``.

    ``buffer_keys`` (BatchNorm statistics and frozen weights: everything the clients do
    not train) keep their current values after the noise is added.
    """
    p, m = cfg.privacy, sampled_clients(cfg)
    wrapper = CLIPPING.get(p.clipping)
    ledger = client_level_ledger(cfg)
    if ledger.delta > 1e-3:
        log.warning("client-level DP: delta=%.2g (0.1 / %d clients) is a weak guarantee; "
                    "it needs many clients (or set privacy.target_delta)", ledger.delta,
                    cfg.clients)
    if hasattr(strategy, "weighted_by_key"):
        strategy.weighted_by_key = UNIFORM_KEY
    kwargs: dict[str, Any] = {"clipping_norm": p.clipping_norm}
    if p.clipping == "adaptive":
        kwargs = {"initial_clipping_norm": p.clipping_norm,
                  "target_clipped_quantile": p.target_clipped_quantile,
                  "clip_norm_lr": p.clip_norm_lr,
                  "clipped_count_stddev": p.clipped_count_stddev}
    cls = type(f"Accounted{wrapper.__name__}", (AccountedClientDP, wrapper), {})
    try:
        wrapped = cls(strategy, noise_multiplier=ledger.noise_multiplier,
                      num_sampled_clients=m, **kwargs)
    except ValueError as exc:  # Flower's own parameter checks
        raise ConfigError(f"client-level DP: {exc}") from exc
    wrapped.ledger = ledger
    wrapped.buffer_keys = frozenset(buffer_keys)
    log.info("client-level DP: sigma=%.4f, C=%g, q=%d/%d, delta=%.2e, budget eps=%g over %d "
             "rounds", ledger.noise_multiplier, p.clipping_norm, m, cfg.clients, ledger.delta,
             p.target_epsilon, cfg.rounds)
    return wrapped
