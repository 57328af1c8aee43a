"""fedimg's grouped Conv2d per-sample gradient rule equals Opacus' rule and autograd."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from fedimg.privacy.grad_samplers import grouped_conv2d_grad_sample


@pytest.mark.parametrize("cin, cout, groups, k, stride, pad, bias", [
    (8, 8, 8, 3, 1, 1, True),  # depthwise
    (16, 16, 16, 5, 2, 2, False),  # depthwise, strided, 5x5, no bias
    (6, 12, 3, 3, 2, 1, True),  # grouped, channel multiplier 2
    (4, 5, 1, 5, 1, 2, True),  # ordinary convolution
])
def test_grouped_rule_equals_opacus_rule(cin, cout, groups, k, stride, pad, bias) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups, bias=bias)
    x = torch.randn(4, cin, 9, 9)
    backprops = torch.randn(4, *conv(x).shape[1:])
    ours = grouped_conv2d_grad_sample(conv, [x], backprops)
    theirs = compute_conv_grad_sample(conv, [x], backprops)
    assert set(ours) == set(theirs)
    for param, value in theirs.items():
        assert ours[param].shape == (4, *param.shape)
        torch.testing.assert_close(ours[param], value, atol=1e-5, rtol=1e-5)


def test_registered_rule_gives_autograd_per_sample_gradients() -> None:
    # Arrange: a depthwise-separable block in Opacus' hooks mode (rule registered on import)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 4, 1),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double()
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is grouped_conv2d_grad_sample
    x, y = torch.randn(3, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 1])
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per_sample = [p.grad_sample.clone() for p in model.parameters()]
    gsm._close()
    # Assert: each sample's gradient equals autograd on that sample alone
    for i in range(3):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1],
                                                                reduction="sum"),
                                    list(model.parameters()))
        for sample, g in zip(per_sample, grads):
            torch.testing.assert_close(sample[i], g, atol=1e-10, rtol=1e-8)
