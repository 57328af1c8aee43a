"""Error hierarchy for fedimg.

Every error a user can cause (a bad config value, a missing data folder, an
unknown model) is a :class:`FedimgError`. Each subclass carries a distinct exit
code so scripts and service managers can tell failures apart, in the spirit of
Flower's ``flwr.common.exit`` codes. Messages state the bad value, the valid
options and the fix.
"""

from __future__ import annotations


class FedimgError(Exception):
    """Base class of all user-facing fedimg errors."""

    exit_code: int = 1


class ConfigError(FedimgError):
    """A config value is unknown, out of range or inconsistent."""

    exit_code = 2


class DataError(FedimgError):
    """A dataset is missing, corrupt or cannot be partitioned as asked."""

    exit_code = 3


class ModelError(FedimgError):
    """A model cannot be built or its weights cannot be loaded."""

    exit_code = 4


class UpdateError(FedimgError):
    """A client update is malformed (wrong shape, dtype, NaN or Inf)."""

    exit_code = 5


class TrainingDiverged(FedimgError):
    """The training loss became NaN or infinite (usually: the learning rate is too high)."""

    exit_code = 7


class PrivacyBudgetExhausted(FedimgError):
    """A client's next round would exceed its differential-privacy budget."""

    exit_code = 6


class RunStopped(FedimgError):
    """The run ended before its last round: too many rounds without usable updates.

    Its results, plots and checkpoints are written first, so it can be resumed.
    """

    exit_code = 8


class PolicyRefused(FedimgError):
    """A deployed site refuses a run config that breaks its own policy (its YAML's ``policy:``)."""

    exit_code = 9


class LedgerError(FedimgError):
    """A site's own privacy ledger is missing, corrupt, or would be lowered: it refuses to train."""

    exit_code = 12
