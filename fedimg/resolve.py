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
from fedimg.privacy.client_dp import sampled_clients
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
    _check(not (spec.sgd_steps and cfg.train.optimizer != "sgd"), f"strategy={cfg.strategy} "
           f"with train.optimizer={cfg.train.optimizer}: it reads how far each client's SGD "
           "steps went (lr x momentum-weighted steps), which an adaptive optimizer does not "
           "follow. Fix: train.optimizer=sgd")
    _check(not (spec.client_deltas and cfg.fl.local_bn), f"strategy={cfg.strategy} with "
           "fl.local_bn=true: it reads each client's update y_i - x, but FedBN clients start "
           "their BatchNorm from their own layers, not x. Fix: drop fl.local_bn")
    _check(not (spec.client_deltas and cfg.fl.personal in ("fedper", "fedrep")),
           f"strategy={cfg.strategy} with fl.personal={cfg.fl.personal}: it reads each "
           "client's update y_i - x, but these clients train from their own head, not x's. "
           "Fix: strategy=fedavg (or fedprox, fedadam, ...), or fl.personal=ditto")
    _check(not (spec.baseline and cfg.fl.personal != "none"), f"strategy={cfg.strategy} "
           f"with fl.personal={cfg.fl.personal}: a baseline trains in-process, with no "
           "client state to keep a personal part in (strategy=local is each site's own "
           "model already). Fix: fl.personal=none, or a federated strategy such as fedavg")
    shared = [name for name in STRATEGIES.names() if not STRATEGIES.get(name).own_messages]
    _check(cfg.sim.cohort_size == 1 or not spec.own_messages, f"sim.cohort_size="
           f"{cfg.sim.cohort_size} with strategy={cfg.strategy}: it sends each client "
           "arrays of its own, so clients cannot share one message. Fix: sim.cohort_size=1, "
           f"or one of {', '.join(shared)}")
    averaging = [name for name in STRATEGIES.names() if STRATEGIES.get(name).averages]
    _check(not (mode == "client_dp" and not spec.averages), f"privacy.mode=client_dp with "
           f"strategy={cfg.strategy}: the accounted epsilon needs the server to average the "
           f"clipped updates; valid strategies: {', '.join(averaging)}")


def _check_secure_facts(cfg: FedimgConfig) -> None:
    """What secure aggregation rules out: anything that must see one client's update."""
    mode, spec = PRIVACY_MODES.get(cfg.privacy.mode), STRATEGIES.get(cfg.strategy)
    secure = cfg.fl.secure_aggregation != "none"
    _check(secure or not mode.needs_secure_sum, f"privacy.mode={cfg.privacy.mode} has the "
           "clients add the noise, which only secure aggregation keeps from the server. Fix: "
           "fl.secure_aggregation=secaggplus")
    if not secure:
        return
    summing = [n for n in STRATEGIES.names() if STRATEGIES.get(n).secure_sum]
    _check(spec.secure_sum, f"strategy={cfg.strategy} with fl.secure_aggregation: it needs "
           "each update, and the server sees only their sum. Valid strategies: "
           f"{', '.join(summing)}")
    _check(not mode.inspects_updates, f"privacy.mode={cfg.privacy.mode} with "
           "fl.secure_aggregation: the server would clip each update, which it cannot see. "
           "Fix: privacy=distributed_dp (the clients clip and noise)")
    _check(cfg.compression.kind == "none", f"compression.kind={cfg.compression.kind} with "
           "fl.secure_aggregation: masks sum only dense vectors of one layout. Fix: "
           "compression.kind=none")
    _check(cfg.fl.max_update_norm is None, f"fl.max_update_norm={cfg.fl.max_update_norm} with "
           "fl.secure_aggregation: the server cannot measure one update's norm. Fix: drop it "
           "(or clip at the clients: privacy=distributed_dp)")
    _check(sampled_clients(cfg) >= 3, f"fl.secure_aggregation with {sampled_clients(cfg)} "
           "sampled clients: with two, each learns the other's update from the sum. Fix: "
           "sample at least 3 (clients, fl.fraction_train, fl.min_train_clients)")


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
    _check_secure_facts(cfg)
    return cfg


def compose_and_check(scenario: str = DEFAULT_SCENARIO,
                      overrides: Sequence[str] = ()) -> FedimgConfig:
    """:func:`~fedimg.config.compose.compose_config`, then :func:`check_registries`."""
    return check_registries(compose_config(scenario, overrides))
