"""Pretrained image models: a name-keyed zoo, head replacement and freezing.

The facade of the package; import from here::

    from fedimg.models import MODELS, build_model, imagenet_model, list_models

``MODELS`` maps each ``model`` config value to a :class:`ModelSpec`.
:func:`build_model` builds the ImageNet network, swaps its head for
``num_classes`` outputs, optionally loads a saved task model and applies a
:class:`~fedimg.config.TransferConfig` (which blocks train, frozen BatchNorm).
For differential privacy, :func:`make_inplace_free` rewrites a built model so
that Opacus' per-sample gradient hooks work (no in-place op left), and each
spec's ``dp_grad_sample_mode`` names the fastest Opacus ``grad_sample_mode``.
This package never imports flwr, ray or opacus.
"""

from fedimg.models.inplace import inplace_ops, make_inplace_free
from fedimg.models.transfer import (
    apply_transfer,
    count_parameters,
    freeze_batchnorm,
    batchnorm_state_keys,
    frozen_state_keys,
)
from fedimg.models.zoo import MODELS, ModelSpec, build_model, imagenet_model, list_models

__all__ = [
    "MODELS",
    "ModelSpec",
    "apply_transfer",
    "build_model",
    "count_parameters",
    "freeze_batchnorm",
    "batchnorm_state_keys",
    "frozen_state_keys",
    "imagenet_model",
    "inplace_ops",
    "list_models",
    "make_inplace_free",
]
