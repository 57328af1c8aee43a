"""Registry checks of a config: the composition root's half of validation.

:func:`fedimg.config.validate` judges what the schema alone can (enum members,
ranges, combinations of values) and imports no registry. This module resolves every
name-valued field through its registry, so an unknown model, strategy or dataset is
refused with the valid names, and checks the combinations that depend on a registry
entry's facts (whether a privacy mode needs every reply, or trains privately).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedimg.config import FedimgConfig
from fedimg.config.compose import DEFAULT_SCENARIO, compose_config
from fedimg.data import AUGMENTATIONS, PARTITIONERS
from fedimg.data.sources import dataset_source
from fedimg.errors import ConfigError
from fedimg.models import MODELS
from fedimg.privacy import PRIVACY_MODES
from fedimg.serverapp.strategies import STRATEGIES
from fedimg.simulation.attacks import ATTACKS
from fedimg.training import OPTIMIZERS, SCHEDULES
from fedimg.transport.codecs import CODECS


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _resolve_names(cfg: FedimgConfig) -> None:
    """Every name-valued field must be a key of its registry (the enums' too: no drift)."""
    dataset_source(cfg.data.dataset)  # an hf:<name> resolves to the hf entry
    for registry, value in (
        (MODELS, cfg.model),
        (STRATEGIES, cfg.strategy),
        (PARTITIONERS, cfg.data.partitioner),
        (AUGMENTATIONS, cfg.data.augment),
        (OPTIMIZERS, cfg.train.optimizer),
        (SCHEDULES, cfg.train.schedule),
        (PRIVACY_MODES, cfg.privacy.mode),
        (ATTACKS, cfg.attack.kind),
    ):
        registry.get(value)
    if cfg.compression.kind != "none":
        CODECS.get(cfg.compression.kind)


def _check_privacy_facts(cfg: FedimgConfig) -> None:
    """Combinations refused because of what the privacy mode's registry entry says."""
    h, mode = cfg.hetero, PRIVACY_MODES.get(cfg.privacy.mode)
    absent = h.availability < 1 or h.dropout > 0 or h.deadline_s is not None
    _check(not (absent and mode.needs_every_reply), f"privacy.mode={cfg.privacy.mode} "
           "releases a round only when every sampled client replied; hetero.availability, "
           "hetero.dropout or hetero.deadline_s would make every round short. Fix: drop them")
    _check(not (mode.private_training and h.clock == "real" and h.deadline_s is not None),
           f"privacy.mode={cfg.privacy.mode} with a real-clock deadline: a late client has "
           "spent budget the server never hears of. Fix: hetero.clock=simulated")
    steps = cfg.fl.personalize_steps
    _check(steps == 0 or not mode.private_training,
           f"fl.personalize_steps={steps} with privacy.mode={cfg.privacy.mode}: those "
           "steps would train on the private data outside DP-SGD and report metrics on it. "
           "Fix: fl.personalize_steps=0")


def _check_strategy_facts(cfg: FedimgConfig) -> None:
    """Privacy modes that need what the strategy's registry entry says it does or not."""
    spec, mode = STRATEGIES.get(cfg.strategy), cfg.privacy.mode
    _check(not (mode == "dp_sgd" and spec.loss_term), f"strategy={cfg.strategy} with "
           "privacy.mode=dp_sgd is not supported: Opacus replaces the gradient by the noisy "
           "per-sample sum, which drops the term this strategy adds to the loss; use fedavg")
    averaging = [name for name in STRATEGIES.names() if STRATEGIES.get(name).averages]
    _check(not (mode == "client_dp" and not spec.averages), f"privacy.mode=client_dp with "
           f"strategy={cfg.strategy}: the accounted epsilon needs the server to average the "
           f"clipped updates; valid strategies: {', '.join(averaging)}")


def check_registries(cfg: FedimgConfig) -> FedimgConfig:
    """Resolve every name of ``cfg`` through its registry; raise ConfigError on the first.

    Part of the composition root: it resolves every name-valued field (model,
    strategy, data.dataset, and the closed sets' registries) and checks the
    combinations that depend on the registry entries' facts. It runs on the server
    and on every client that decodes a config, after :func:`fedimg.config.validate`
    (which :func:`fedimg.config.from_json` and :func:`compose_config` already ran).
    """
    _resolve_names(cfg)
    _check_privacy_facts(cfg)
    _check_strategy_facts(cfg)
    return cfg


def compose_and_check(scenario: str = DEFAULT_SCENARIO,
                      overrides: Sequence[str] = ()) -> FedimgConfig:
    """:func:`~fedimg.config.compose.compose_config`, then :func:`check_registries`."""
    return check_registries(compose_config(scenario, overrides))
