"""Opacus per-sample gradients of every zoo model equal one-sample-at-a-time autograd.

Each model is trained fully with frozen BatchNorm (train-mode BatchNorm mixes the
samples of a batch) and wrapped after :func:`make_inplace_free`, in the Opacus
mode its spec names (``dp_grad_sample_mode``), with fedimg's grouped Conv2d rule
registered (:mod:`fedimg.privacy.grad_samplers`, as the DP-SGD path does).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

import fedimg.privacy.grad_samplers  # noqa: F401 - the Conv2d rule DP-SGD uses
from fedimg.config import TransferConfig
from fedimg.models import MODELS, build_model, list_models
from tests.support.private_models import private_model, zoo_params

LABELS = torch.tensor([0, 1, 2])
# per-sample gradients (hooks, functorch); ghost_mixed forms only their norms, checked
# against these in tests/privacy/test_norm_samplers.py
CASES = zoo_params([(name, "hooks") for name in list_models()]) + [
    ("resnet18", "functorch"),  # functorch through Lite0 takes 40 s: with the slow tests
    pytest.param("efficientnet_lite0", "functorch", marks=pytest.mark.slow),
]




def _one_at_a_time(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample gradients by plain autograd, one sample per backward: name -> (B, *shape)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), LABELS[i:i + 1], reduction="sum")
        rows.append(torch.autograd.grad(loss, [p for _, p in named]))
    return {n: torch.stack([row[j] for row in rows]) for j, (n, _) in enumerate(named)}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # the stem's input
@pytest.mark.parametrize(("name", "mode"), CASES)
def test_per_sample_gradients_match_autograd(name: str, mode: str) -> None:
    # Arrange
    model = private_model(name)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    expected = _one_at_a_time(model, x)
    head = MODELS.get(name).head
    first = next(iter(expected))

    # Act
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum",
                           force_functorch=mode == "functorch")
    try:
        F.cross_entropy(gsm(x), LABELS, reduction="sum").backward()
        actual = {n: p.grad_sample for n, p in model.named_parameters() if p.requires_grad}
    finally:
        gsm._close()

    # Assert: every trainable tensor, among them the stem conv and the new head,
    # to 1e-6 of its own largest entry; the samples' gradients really differ
    assert isinstance(model.get_submodule(first.rpartition(".")[0]), nn.Conv2d)
    assert {first, f"{head}.weight", f"{head}.bias"} <= set(actual)
    assert actual.keys() == expected.keys()
    for param_name, per_sample in expected.items():
        scale = float(per_sample.abs().max())
        assert scale > 1e-4, f"{param_name}: vanishing gradient {scale:.1e}"
        torch.testing.assert_close(actual[param_name], per_sample, rtol=1e-6, atol=1e-6 * scale,
                                   msg=lambda m, n=param_name: f"{n}: {m}")
    spread = expected[first][0] - expected[first][1]
    assert float(spread.abs().max()) > 1e-2 * float(expected[first].abs().max())


def test_stock_mobilenet_fails_under_opacus_hooks_without_the_rewrite() -> None:
    # Arrange: Hardswish(inplace=True) after a hooked layer (meta-pytorch/opacus#828)
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", num_classes=3, weights="none",
                        transfer=TransferConfig(mode="full", bn="frozen")).train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    # Act / Assert
    try:
        with pytest.raises(RuntimeError, match="is being modified inplace"):
            gsm(torch.randn(3, 3, 32, 32)).sum().backward()
    finally:
        gsm._close()
