"""fedimg's configuration: the typed schema (:mod:`.schema`) and its validation (:mod:`.checks`)."""

from fedimg.config.checks import validate
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
    SimConfig,
    SyntheticConfig,
    TrainConfig,
    TransferConfig,
    from_dict,
    from_json,
    to_dict,
    to_json,
)

__all__ = [
    "AttackConfig", "CompressionConfig", "DataConfig", "DeployConfig", "FaultsConfig",
    "FederationConfig", "FedimgConfig", "HeterogeneityConfig",
    "OutputConfig", "PrivacyConfig", "SimConfig", "SyntheticConfig", "TrainConfig",
    "TransferConfig", "from_dict", "from_json", "to_dict", "to_json", "validate",
]
