"""fedimg: federated fine-tuning of ImageNet-pretrained CNNs with Flower.

See ARCHITECTURE.md for the packages, what each may import, and the path of one
round. In short (imports point down this list, never up):

* :mod:`fedimg.serverapp`, :mod:`fedimg.clientapp`, :mod:`fedimg.simulation`,
  :mod:`fedimg.deploy`, :mod:`fedimg.audit`: the roles of a run.
* :mod:`fedimg.build`: the composition root (config -> data, model, strategy, callbacks).
* :mod:`fedimg.transport`, :mod:`fedimg.privacy`, :mod:`fedimg.reporting`.
* :mod:`fedimg.data`, :mod:`fedimg.models`, :mod:`fedimg.training`: plain PyTorch;
  they never import flwr, ray or opacus.
* :mod:`fedimg.config`: the frozen typed schema; standard library and OmegaConf only.
"""

import os

# Flower reads these when it is first imported, so they are set before any flwr import.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

__version__ = "0.1.0"
