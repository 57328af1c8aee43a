"""fedimg: federated fine-tuning of ImageNet-pretrained CNNs with Flower.

Layout (imports point inward):

* :mod:`fedimg.data`, :mod:`fedimg.models`, :mod:`fedimg.training`: plain PyTorch;
  they never import flwr, ray or opacus.
* :mod:`fedimg.federation`: the Flower ClientApp/ServerApp and strategy registry.
* :mod:`fedimg.engine`: the only importer of ``flwr.simulation`` and ``ray``.
* :mod:`fedimg.reporting`: run directory, metrics, plots and the summary table.
* :mod:`fedimg.simulate`: ``python -m fedimg.simulate scenario=medical``.
"""

__version__ = "0.1.0"
