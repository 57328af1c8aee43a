"""The closed sets of config values, one ``str``-mixin :class:`~enum.Enum` each.

A member's name equals its value (``Augment.light == "light"``) because OmegaConf
looks a member up by its *name* when a scenario file or an override gives a string;
so ``data.augment=light`` composes, and ``data.augment=wild`` is refused with the
valid values listed. Being ``str`` subclasses, members compare and hash like their
values: ``cfg.data.augment == "light"`` and ``AUGMENTATIONS.get(cfg.data.augment)``
keep working, and ``str()`` / f-strings give the bare value. :func:`fedimg.config.to_dict`
turns them back into plain strings wherever a config leaves Python.

Each enum names the registry (or constant) its values must equal; a test checks it.
Open sets (``model``, ``strategy``, ``data.dataset``, ``weights``, ``train.device``,
``output.select_metric``) stay ``str`` and are resolved by :mod:`fedimg.resolve`.
"""

from __future__ import annotations

from enum import Enum, nonmember
from typing import Any, ClassVar

from fedimg.errors import ConfigError


class Choice(str, Enum):
    """Base of the closed sets: ``label`` says what a value is, for error messages."""

    label: ClassVar[str]

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> list[str]:
        """The valid values, in declaration order."""
        return [str(member.value) for member in cls]

    @classmethod
    def unknown_message(cls, key: str, value: object) -> str:
        """One line naming the key, the bad value, the valid values and the fix."""
        return (f"unknown {cls.label} '{value}' ({key}); valid: {', '.join(cls.values())}. "
                f"Fix: set {key} to one of them")

    @classmethod
    def parse(cls, value: Any, *, key: str) -> Choice:
        """The member whose value is ``value``; else a ConfigError naming ``key``."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(cls.unknown_message(key, value)) from None


class DataSource(Choice):
    """``data.source``: auto (real data, else synthetic with a warning) | strict | synthetic."""

    label = nonmember("data source")
    auto = "auto"
    strict = "strict"
    synthetic = "synthetic"


class Partitioner(Choice):
    """``data.partitioner``: the keys of :data:`fedimg.data.partitioners.PARTITIONERS`."""

    label = nonmember("partitioner")
    iid = "iid"
    dirichlet = "dirichlet"
    quantity = "quantity"
    shards = "shards"
    natural = "natural"


class Augment(Choice):
    """``data.augment``: the keys of :data:`fedimg.data.transforms.AUGMENTATIONS`."""

    label = nonmember("augmentation preset")
    none = "none"
    light = "light"
    strong = "strong"


class OnCorrupt(Choice):
    """``data.on_corrupt``: refuse (list the files) | skip (warn, drop); ``decode.ON_CORRUPT``."""

    label = nonmember("corrupt-file policy")
    refuse = "refuse"
    skip = "skip"


class TransferMode(Choice):
    """``transfer.mode``: :data:`fedimg.models.transfer.MODES`."""

    label = nonmember("transfer mode")
    full = "full"
    head = "head"
    last_k = "last_k"


class BatchNorm(Choice):
    """``transfer.bn``: train (statistics update) | frozen; ``models.transfer.BN_MODES``."""

    label = nonmember("BatchNorm mode")
    train = "train"
    frozen = "frozen"


class Optimizer(Choice):
    """``train.optimizer``: the keys of :data:`fedimg.training.optim.OPTIMIZERS`."""

    label = nonmember("optimizer")
    sgd = "sgd"
    adamw = "adamw"


class Schedule(Choice):
    """``train.schedule`` (over rounds): the keys of :data:`fedimg.training.optim.SCHEDULES`."""

    label = nonmember("lr schedule")
    constant = "constant"
    cosine = "cosine"
    step = "step"


class LocalBudget(Choice):
    """``train.local_budget``: :data:`fedimg.training.budget.LOCAL_BUDGETS`, the steps
    of a client's round: ``local_epochs`` passes (or ``local_steps``), exactly
    ``local_steps``, or ``ceil(steps_per_sample x n_i)``."""

    label = nonmember("local budget")
    epochs = "epochs"
    steps = "steps"
    steps_per_sample = "steps_per_sample"


class ClassWeighting(Choice):
    """``train.class_weighting``: none | balanced | federated.

    balanced: inverse class frequency of the client's own images. federated: inverse
    class frequency of the whole federation's (the weights pooled training's balanced
    loss uses), from the class counts the server sums before round 1.
    """

    label = nonmember("class weighting")
    none = "none"
    balanced = "balanced"
    federated = "federated"


class OnTooFew(Choice):
    """``fl.on_too_few``: retry (then skip) | skip (keep the model) | stop (end the run)."""

    label = nonmember("short-round policy")
    retry = "retry"
    skip = "skip"
    stop = "stop"


class SecureAggregation(Choice):
    """``fl.secure_aggregation``: none | secaggplus (Bell et al. 2020; fedimg.privacy.secagg)."""

    label = nonmember("secure aggregation protocol")
    none = "none"
    secaggplus = "secaggplus"


class Personal(Choice):
    """``fl.personal``: none | fedper | fedrep | ditto (fedimg.clientapp.personal)."""

    label = nonmember("personalisation")
    none = "none"
    fedper = "fedper"  # Arivazhagan et al. 2019: a shared body, each client's own head
    fedrep = "fedrep"  # Collins et al. 2021: head first (body frozen), then body
    ditto = "ditto"  # Li et al. 2021: a personal model kept near the global one


class HeadInit(Choice):
    """``fl.head_init``: none | ridge (fedimg.serverapp.head_init, before round 1)."""

    label = nonmember("head initialisation")
    none = "none"
    ridge = "ridge"  # Fani et al. 2024 (Fed3R): the closed-form ridge head of all clients


class Clock(Choice):
    """``hetero.clock``: simulated (scaled compute time) | real (slow clients sleep)."""

    label = nonmember("clock")
    simulated = "simulated"
    real = "real"


class Compression(Choice):
    """``compression.kind``: none, or a key of :data:`fedimg.transport.codecs.CODECS`."""

    label = nonmember("compression")
    none = "none"
    fp16 = "fp16"
    int8 = "int8"
    topk = "topk"


class PrivacyKind(Choice):
    """``privacy.mode``: the keys of :data:`fedimg.privacy.PRIVACY_MODES`."""

    label = nonmember("privacy mode")
    none = "none"
    dp_sgd = "dp_sgd"
    client_dp = "client_dp"
    distributed_dp = "distributed_dp"


class Accountant(Choice):
    """``privacy.accountant``: :data:`fedimg.privacy.accounting.ACCOUNTANTS`."""

    label = nonmember("accountant")
    prv = "prv"
    rdp = "rdp"


class GradSampleMode(Choice):
    """``privacy.grad_sample_mode``: auto (per model), or ``models.zoo.DP_GRAD_SAMPLE_MODES``."""

    label = nonmember("grad-sample mode")
    auto = "auto"
    hooks = "hooks"
    functorch = "functorch"
    ghost_mixed = "ghost_mixed"  # norms only (Bu et al. 2022), fedimg.privacy.norm_samplers


class FeatureCache(Choice):
    """``train.feature_cache``: :data:`fedimg.training.feature_cache.MODES`."""

    label = nonmember("feature-cache mode")
    auto = "auto"
    on = "on"
    off = "off"


class Clipping(Choice):
    """``privacy.clipping`` (client_dp): the keys of :data:`fedimg.privacy.client_dp.CLIPPING`."""

    label = nonmember("client-level clipping")
    fixed = "fixed"
    adaptive = "adaptive"


class AttackKind(Choice):
    """``attack.kind``: the keys of :data:`fedimg.simulation.attacks.ATTACKS`."""

    label = nonmember("attack")
    sign_flip = "sign_flip"
    scale = "scale"
    label_flip = "label_flip"


CHOICES: tuple[type[Choice], ...] = (
    DataSource, Partitioner, Augment, OnCorrupt, TransferMode, BatchNorm, Optimizer,
    Schedule, ClassWeighting, OnTooFew, Clock, Compression, PrivacyKind, Accountant,
    GradSampleMode, Clipping, AttackKind, SecureAggregation, FeatureCache, LocalBudget,
    Personal, HeadInit,
)
