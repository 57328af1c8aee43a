"""Mixed ghost clipping for convolutions: per-sample gradient norms without per-sample gradients.

Bu, Mao & Xu 2022, "Scalable and Efficient Training of Large Convolutional Neural
Networks with Differential Privacy" (NeurIPS). DP-SGD needs every sample's gradient
*norm* to clip, and then only the clipped *sum*. Opacus' fast-gradient path
(``GradSampleModuleFastGradientClipping``) computes the norms in a first backward
pass, then backpropagates ``sum_i c_i * loss_i`` (c_i the clipping factors) in a
second, plain one; it knows the norms of ``nn.Linear`` and ``nn.Embedding`` without
materialising their per-sample gradients, and falls back to materialising them for
every other layer. This module registers, through Opacus' own ``register_norm_sampler``,
the norm of a ``Conv2d``'s per-sample gradient (ordinary, grouped, depthwise). With the
unfolded input ``a_i`` (L positions x p = I/G * kh * kw values per group) and the
output gradient ``b_i`` (L x o = O/G per group), the weight gradient of sample i in
group g is ``G_i = b_i^T a_i`` (o x p), and either

* **ghost norm** (Goodfellow 2015; Li et al. 2022 for sequences; Bu et al. for convs):
  ``||G_i||^2 = sum_{l,l'} <a_il, a_il'> <b_il, b_il'>``, two L x L Gram matrices,
  cost ~ N * L^2 * (p + o) per group and memory 2 * N * L^2; or
* **instantiated**: ``G_i`` itself, then its norm, cost ~ N * L * p * o, memory N * p * o.

Bu et al.'s layer-wise rule (their Algorithm 1, "mixed ghost clipping") takes the ghost
norm when ``2 * L^2 < p * o``, i.e. when the two Gram matrices are smaller than the
per-sample gradient. The groups of a layer share L, p and o, so the rule picks per
layer. In fedimg's zoo at 32 px it picks the ghost norm for the small-L, wide layers
(ResNet's 3x3 convs after the stem, the 1x1 convs late in EfficientNet/MobileNet) and
instantiation for depthwise convs (p * o = 9 or 25, unless L = 1) and the stems. A
depthwise or grouped conv's per-sample gradients are formed as one forward conv with
the backprops as kernels (:func:`_grouped_squared`), others from the unfolded input.
Bias norms are ``||sum_l b_il||``. Every trainable layer of the zoo under DP-SGD (frozen
BatchNorm has no parameters) is a Conv2d or a Linear, whose norm sampler is Opacus' own.

:class:`GhostClippingModule` is the model's wrapper in DP-SGD with
``privacy.grad_sample_mode=ghost_mixed``. It takes the per-sample loss gradients from
the model's output, where the training loop's own ``loss.backward()`` leaves them, so
:func:`fedimg.training.train_local` stays unchanged (the loss of each sample must depend
on its own logits only, as DP-SGD requires anyway); runs Opacus' norm pass; and forms the
clipped sum by Bu et al.'s later book-keeping (2023) from the tensors that pass kept, or
by Opacus' second backward pass. Importing this module registers the Conv2d rule.
"""

from __future__ import annotations

from typing import Literal

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.utils import register_norm_sampler
from opacus.utils.module_utils import trainable_modules
from opacus.utils.tensor_utils import unfold2d
from torch import nn

Rule = Literal["auto", "ghost", "instantiate"]


def use_ghost_norm(*, positions: int, inputs: int, outputs: int) -> bool:
    """Bu et al.'s rule for one group: ghost norm when ``2 L^2 < p * o``."""
    return 2 * positions * positions < inputs * outputs


def _ghost_squared(cols: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """sum_g sum_{l,l'} <a_l, a_l'> <b_l, b_l'> of cols (N, G, p, L), grads (N, G, o, L): (N,)."""
    a_gram = cols.transpose(-1, -2) @ cols  # (N, G, L, L)
    b_gram = grads.transpose(-1, -2) @ grads  # (N, G, L, L)
    return (a_gram * b_gram).flatten(1).sum(dim=1)


def _instantiated_squared(cols: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """||b^T a||^2 summed over the groups, via the per-sample gradient (N, G, o, p): (N,)."""
    return (grads @ cols.transpose(-1, -2)).flatten(1).pow(2).sum(dim=1)


def _grouped_squared(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor
                     ) -> torch.Tensor:
    """||G_i||^2 (N,) of a grouped conv, its per-sample gradients as one forward conv.

    G[n, g, o, i, u, v] = sum_{y,x} b[n, g, o, y, x] * x_pad[n, g, i, d*u + s*y, d*v + s*x]:
    a conv of the input (batch i, channels (n, g)) with the backprops as its
    (N*G*o, 1, Ho, Wo) kernels, groups N*G, dilation s and stride d swapped. ATen's
    forward depthwise kernels make this several times faster than the weight-gradient
    kernels or unfolding for the depthwise convs (p * o = kh * kw) the rule sends here.
    """
    n, groups = x.shape[0], layer.groups
    (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
    x = nn.functional.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    per_group = layer.in_channels // groups
    x = x.reshape(n * groups, per_group, *x.shape[2:]).transpose(0, 1)  # (I/G, N*G, H, W)
    kernels = backprops.reshape(-1, 1, *backprops.shape[2:])  # (N*O, 1, Ho, Wo)
    grads = nn.functional.conv2d(x, kernels, stride=layer.dilation, dilation=layer.stride,
                                 groups=n * groups)[..., :kh, :kw]  # (I/G, N*O, kh, kw)
    return grads.reshape(per_group, n, -1).pow(2).sum(dim=(0, 2))


def conv2d_weight_norms(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor, *,
                        rule: Rule = "auto") -> torch.Tensor:
    """Per-sample norms (N,) of the weight gradient of ``layer`` at input x (N, I, H, W)."""
    n, groups = x.shape[0], layer.groups
    positions = backprops.shape[2] * backprops.shape[3]  # L
    inputs = layer.in_channels // groups * layer.kernel_size[0] * layer.kernel_size[1]  # p
    outputs = layer.out_channels // groups  # o
    ghost = (use_ghost_norm(positions=positions, inputs=inputs, outputs=outputs)
             if rule == "auto" else rule == "ghost")
    if not ghost and groups > 1 and not isinstance(layer.padding, str):
        return _grouped_squared(layer, x, backprops).sqrt()
    cols = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding,
                    stride=layer.stride, dilation=layer.dilation)  # (N, G*p, L)
    cols = cols.reshape(n, groups, inputs, positions)  # (N, G, p, L)
    grads = backprops.reshape(n, groups, outputs, positions)  # (N, G, o, L)
    squared = _ghost_squared(cols, grads) if ghost else _instantiated_squared(cols, grads)
    return squared.clamp(min=0).sqrt()


@register_norm_sampler(nn.Conv2d)
def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor, *, rule: Rule = "auto"
                       ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms (N,) of a Conv2d's weight and bias (Opacus' norm-sampler contract).

    ``rule`` forces one branch ("ghost" or "instantiate"); "auto" applies
    :func:`use_ghost_norm`. Padding may be numbers or "same"/"valid" (``unfold2d``
    pads like ``nn.Conv2d``); only ``padding_mode="zeros"`` is modelled.
    """
    x = activations[0].to(backprops.dtype)  # (N, I, H, W)
    n = x.shape[0]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = (conv2d_weight_norms(layer, x, backprops, rule=rule) if n
                             else backprops.new_zeros(0))
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3)).norm(dim=1)  # (N, O) -> (N,)
    return ret


def bookkeepable(module: nn.Module) -> bool:
    """Whether :func:`clipped_sum` can form ``module``'s gradient from its kept tensors."""
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and not isinstance(module.padding, str)
            and module.padding_mode == "zeros")


def _grouped_weight_sum(layer: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor
                        ) -> torch.Tensor:
    """A grouped conv's weight gradient (O, I/G, kh, kw), summed over the batch, as one
    forward conv (like :func:`_grouped_squared`, but groups G with the N samples as each
    group's input channels)."""
    n, groups = x.shape[0], layer.groups
    (ph, pw), (kh, kw) = layer.padding, layer.kernel_size
    x = nn.functional.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    per_group, outputs = layer.in_channels // groups, layer.out_channels // groups
    x = x.reshape(n, groups, per_group, *x.shape[2:]).permute(2, 1, 0, 3, 4)
    kernels = grad.reshape(n, groups, outputs, *grad.shape[2:]).permute(1, 2, 0, 3, 4)
    out = nn.functional.conv2d(x.reshape(per_group, groups * n, *x.shape[3:]),
                               kernels.reshape(groups * outputs, n, *grad.shape[2:]),
                               stride=layer.dilation, dilation=layer.stride, groups=groups)
    return out[..., :kh, :kw].transpose(0, 1)  # (O, I/G, kh, kw)


def _conv_sum(layer: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, *, bias: bool
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A Conv2d's batch-summed weight and bias gradients (None where not asked for).

    ATen's weight-gradient kernel, except for grouped convs larger than 3x3 on the CPU,
    where it is several times slower than :func:`_grouped_weight_sum` (EfficientNet-Lite0's
    nine 5x5 depthwise convs at 32 px: 31 ms against 5 ms, 2 threads).
    """
    if layer.groups > 1 and layer.kernel_size[0] * layer.kernel_size[1] > 9 \
            and x.device.type == "cpu" and layer.weight.requires_grad:
        return _grouped_weight_sum(layer, x, grad), grad.sum(dim=(0, 2, 3)) if bias else None
    mask = [False, layer.weight.requires_grad, bias]
    _, weight, bias_grad = torch.ops.aten.convolution_backward(
        grad, x, layer.weight, [layer.out_channels] if bias else None, layer.stride,
        layer.padding, layer.dilation, False, [0, 0], layer.groups, mask)
    return weight, bias_grad


def clipped_sum(module: nn.Module, x: torch.Tensor, grad: torch.Tensor
                ) -> dict[nn.Parameter, torch.Tensor]:
    """The batch's gradient of ``module``'s trainable parameters from its input x (N, ...)
    and output gradient (N, ...), the latter already scaled per sample by its factor."""
    x = x.to(grad.dtype)
    bias = module.bias if module.bias is not None and module.bias.requires_grad else None
    if isinstance(module, nn.Conv2d):
        weight, bias_grad = _conv_sum(module, x, grad, bias=bias is not None)
    else:  # nn.Linear, any number of middle dimensions
        weight = torch.einsum("n...o,n...i->oi", grad, x)
        bias_grad = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
    ret = {module.weight: weight} if module.weight.requires_grad else {}
    return {**ret, bias: bias_grad} if bias is not None else ret


class _KeepingGSM(GradSampleModuleFastGradientClipping):
    """Opacus' module whose backward hook also keeps each bookkeepable layer's input and
    output gradient (of the mean loss) in :attr:`kept`, for :func:`clipped_sum`."""

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        super().__init__(model, batch_first=True, loss_reduction="mean",
                         max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        self.kept: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def capture_backprops_hook(self, module: nn.Module, _forward_input: torch.Tensor,
                               forward_output: torch.Tensor, loss_reduction: str,
                               batch_first: bool) -> None:
        """Opacus' hook (the per-sample norms), keeping the layer's tensors on the way."""
        activations = getattr(module, "activations", None)
        keep = self.hooks_enabled and bool(activations) and bookkeepable(module)
        x = activations[-1][0] if keep else None  # the one Opacus pops below
        super().capture_backprops_hook(module, _forward_input, forward_output,
                                       loss_reduction, batch_first)
        if keep:
            self.kept.append((module, x, forward_output[0].detach()))


class GhostClippingModule(nn.Module):
    """``model`` in Opacus' fast-gradient-clipping module: clipped without per-sample gradients.

    ``forward`` returns the logits *detached* (a leaf that requires grad): the training
    loop's ``loss.backward()`` stops there and leaves dloss/dlogits (b, K) on it, which
    is all the rest needs, as sample i's loss depends on logits row i only. The
    optimizer's step then calls :meth:`per_sample_norms` (pass 1: Opacus' hooks compute
    each sample's gradient norm) and :meth:`backward_clipped`: the weighted, clipped sum
    into ``p.grad``. Pass 1 forms no weight gradient: it backpropagates only to the
    inputs of the trainable layers that have no gradient of their own (the stem's, or
    the first trained block's when the rest is frozen), made leaves in the forward.
    When every trainable layer is a Conv2d or Linear (:func:`bookkeepable`, all of
    fedimg's zoo), that sum comes from the inputs and output gradients pass 1 kept, one
    weight-gradient product per layer: Bu et al.'s book-keeping (2023, "Differentially
    Private Optimization on Large Model at Small Cost", ICML). Otherwise it is Opacus'
    second backward pass of ``sum_i c_i * loss_i`` with its hooks off (as
    ``DPTensorFastGradientClipping.backward``). The loss is a per-micro-batch mean.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        super().__init__()
        self.gsm = _KeepingGSM(model, max_grad_norm=max_grad_norm)
        layers = [m for _, m in trainable_modules(model)]
        self.bookkeeping = all(bookkeepable(m) for m in layers)
        self._leaves: list[torch.Tensor] = []  # where pass 1 ends
        self._cuts = [m.register_forward_pre_hook(self._cut) for m in layers]
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def _cut(self, module: nn.Module, args: tuple) -> tuple | None:
        """A trainable layer's input without a gradient of its own becomes a leaf for pass 1
        (integer inputs, e.g. an embedding's: pass 1 ends at the layer's weights instead)."""
        if not torch.is_grad_enabled() or not module.training:
            return None
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if x.requires_grad:
                return None
            leaf = x.detach().requires_grad_(True)
            self._leaves.append(leaf)
            return (leaf, *args[1:])
        self._leaves.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (b, K) of x (b, C, S, S), cut off from the graph (kept for both passes)."""
        self.gsm.kept.clear()
        self._leaves = []
        out = self.gsm(x.detach())  # (b, K)
        if not out.requires_grad:  # no_grad / inference: nothing to backpropagate later
            return out
        tap = out.detach().requires_grad_(True)
        self._pending = (out, tap)
        return tap

    def _awaiting(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last forward's output and dloss/dlogits (b, K)."""
        if self._pending is None:
            raise RuntimeError("GhostClippingModule: no forward pass awaits its backward; "
                               "call the model, then loss.backward(), then optimizer.step()")
        out, tap = self._pending
        return out, tap.grad if tap.grad is not None else torch.zeros_like(tap)

    def per_sample_norms(self) -> torch.Tensor:
        """Pass 1: the norm (b,) of every sample's gradient of its own loss (Opacus' hooks)."""
        out, grad = self._awaiting()
        torch.autograd.grad(out, self._leaves, grad, retain_graph=not self.bookkeeping,
                            allow_unused=True)  # activation gradients only
        self._leaves = []
        return self.gsm.get_norm_sample()

    def backward_clipped(self, factor: torch.Tensor, params: list[torch.Tensor]) -> None:
        """``p.grad = sum_i factor_i * grad loss_i`` for every p in ``params``, after pass 1."""
        out, grad = self._awaiting()
        self._pending, kept, self.gsm.kept = None, self.gsm.kept, []
        scale = len(grad) * factor.to(grad)  # (b,): undo the mean, then weigh each sample
        for p in params:
            p.grad = None
        if self.bookkeeping:
            for module, x, g in kept:
                for p, value in clipped_sum(module, x, g * scale.view(-1, *[1] * (g.dim() - 1))
                                            ).items():
                    p.grad = value if p.grad is None else p.grad + value
        else:
            self.gsm.disable_hooks()
            try:
                torch.autograd.backward(out, grad * scale.unsqueeze(1), inputs=params)
            finally:
                self.gsm.enable_hooks()
        for p in params:
            if p.grad is None:  # a parameter this batch did not reach: gradient 0
                p.grad = torch.zeros_like(p)

    def _close(self) -> None:
        """Remove Opacus' hooks and per-sample attributes (GradSampleModule's name for it)."""
        self._pending, self._leaves = None, []
        self.gsm.kept.clear()
        for handle in self._cuts:
            handle.remove()
        self.gsm._close()
