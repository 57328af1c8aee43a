"""fedimg's configuration: the frozen typed schema and the checks that need no registry.

* :mod:`.schema`: the dataclasses (all frozen).
* :mod:`.codec`: :func:`to_dict` / :func:`to_json`, and :func:`decode` (types checked).
* :mod:`.choices`: one ``str`` enum per closed set of values (``data.augment``, ...).
* :mod:`.checks`: :func:`validate`, and :func:`from_dict` / :func:`from_json`, which
  validate what they decode.
* :mod:`.compose`: scenario file + overrides -> a validated config.

Nothing here imports more than the standard library, OmegaConf (lazily, in
:mod:`.compose`) and :mod:`fedimg.errors`. Names resolved through registries (model,
strategy, dataset) are checked by :func:`fedimg.resolve.check_registries`.
"""

from fedimg.config.checks import from_dict, from_json, validate
from fedimg.config.choices import (
    CHOICES,
    Accountant,
    AttackKind,
    Augment,
    BatchNorm,
    Choice,
    ClassWeighting,
    Clipping,
    Clock,
    Compression,
    DataSource,
    FeatureCache,
    GradSampleMode,
    HeadInit,
    LocalBudget,
    OnCorrupt,
    OnTooFew,
    Optimizer,
    Partitioner,
    Personal,
    PrivacyKind,
    Schedule,
    SecureAggregation,
    TransferMode,
)
from fedimg.config.schema import (
    AttackConfig,
    CompressionConfig,
    DataConfig,
    DeployConfig,
    FaultsConfig,
    FederationConfig,
    FedimgConfig,
    HeterogeneityConfig,
    OutputConfig,
    PrivacyConfig,
    SecAggConfig,
    SimConfig,
    SyntheticConfig,
    TrainConfig,
    TransferConfig,
)
from fedimg.config.codec import decode, to_dict, to_json

__all__ = [
    "CHOICES", "Accountant", "AttackKind", "Augment", "BatchNorm", "Choice", "ClassWeighting",
    "Clipping", "Clock", "Compression", "DataSource", "FeatureCache", "GradSampleMode",
    "LocalBudget", "OnCorrupt",
    "OnTooFew", "Optimizer", "Partitioner", "Personal", "HeadInit", "PrivacyKind", "Schedule", "SecureAggregation",
    "TransferMode",
    "AttackConfig", "CompressionConfig", "DataConfig", "DeployConfig", "FaultsConfig",
    "FederationConfig", "FedimgConfig", "HeterogeneityConfig",
    "OutputConfig", "PrivacyConfig", "SecAggConfig", "SimConfig", "SyntheticConfig", "TrainConfig",
    "TransferConfig", "decode", "from_dict", "from_json", "to_dict", "to_json", "validate",
]
