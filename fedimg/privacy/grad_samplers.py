"""A per-sample gradient rule for grouped and depthwise 2-D convolutions (Opacus hooks mode).

Opacus 1.6's ``Conv2d`` grad sampler computes, for a convolution with G groups, the
full (G*O/G) x (G*I/G*k) product per sample and then extracts its G diagonal blocks
(``einsum("ngrg...->ngr...")``): G times the necessary work and memory. For the
depthwise convolutions of EfficientNet and MobileNet (G = channels, up to 1152)
this makes hook-mode DP-SGD tens of times slower than a normal step. The rule here
computes only the diagonal blocks, with the same unfolded activations:

    grad[n, g, o, p] = sum_l backprops[n, g, o, l] * unfold(x)[n, g, p, l]

which is the same quantity (Goodfellow 2015, "Efficient Per-Example Gradient
Computations", for the unfold formulation; Opacus' own test suite checks the rule's
contract). Importing this module registers it for ``nn.Conv2d`` in Opacus'
``GradSampleModule.GRAD_SAMPLERS``, replacing Opacus' rule for every Conv2d.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn


@register_grad_sampler(nn.Conv2d)
def grouped_conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d's weight (N, O, I/G, kh, kw) and bias (N, O)."""
    x = activations[0].to(backprops.dtype)  # (N, I, H, W)
    n, groups = x.shape[0], layer.groups
    if n == 0 or isinstance(layer.padding, str):
        return compute_conv_grad_sample(layer, activations, backprops)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        cols = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding,
                        stride=layer.stride, dilation=layer.dilation)  # (N, I*kh*kw, L)
        cols = cols.reshape(n, groups, -1, cols.shape[-1])  # (N, G, I/G*kh*kw, L)
        grads = backprops.reshape(n, groups, layer.out_channels // groups, -1)  # (N,G,O/G,L)
        sample = torch.einsum("ngol,ngpl->ngop", grads, cols)  # (N, G, O/G, I/G*kh*kw)
        ret[layer.weight] = sample.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2)
    return ret
