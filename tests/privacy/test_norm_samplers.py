"""Mixed ghost clipping (Bu et al. 2022): Conv2d gradient norms, every zoo model, one DP step.

The norms come from :mod:`fedimg.privacy.norm_samplers` without per-sample gradients;
they must equal the norms of per-sample gradients from autograd (one sample at a
time) and from the materialised hooks path, and the DP-SGD step built on them must
be the step of the materialised path: same clipping, weights, noise and epsilon.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from fedimg.config import TransferConfig
from fedimg.config.compose import compose_config
from fedimg.data import InMemoryLoader
from fedimg.models import MODELS, apply_transfer, build_model, list_models, make_inplace_free
from fedimg.privacy import norm_samplers
from fedimg.privacy.accounting import PrivacyLedger
from fedimg.privacy.dp_sgd import make_private, train_private
from fedimg.privacy.norm_samplers import GhostClippingModule, conv2d_norm_sample, use_ghost_norm
from tests.support.private_models import private_model, zoo_params

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CPU = torch.device("cpu")
CONVS = {  # in, out, groups, kernel, stride, padding, dilation, bias
    "ordinary": (4, 6, 1, 3, 1, 1, 1, True),
    "grouped_stride2": (6, 12, 3, 3, 2, 1, 1, True),
    "depthwise_5x5_stride2": (8, 8, 8, 5, 2, 2, 1, False),
    "grouped_dilated_asym_pad": (12, 6, 3, 3, 2, (1, 2), (2, 1), True),
    "same_even_kernel": (4, 5, 1, 4, 1, "same", 2, False),
    "valid_depthwise": (6, 6, 6, 3, 1, "valid", 1, True),
    "grouped_5x5_dilated": (6, 12, 3, 5, 2, 3, 2, True),
}


def _autograd_norms(conv: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor
                    ) -> list[torch.Tensor]:
    """Per-parameter norms (N,) of sample i's gradient of <conv(x_i), backprops_i>."""
    rows = [torch.autograd.grad(conv(x[i:i + 1]), list(conv.parameters()), backprops[i:i + 1])
            for i in range(len(x))]
    return [torch.stack([row[j].norm() for row in rows]) for j in range(len(rows[0]))]


@pytest.mark.parametrize("rule", ["ghost", "instantiate", "auto"])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv2d_norms_equal_autograd_per_sample_gradient_norms(case: str, rule: str) -> None:
    # Arrange: a 11 x 10 input (odd and even sizes), random output gradients, float64
    cin, cout, groups, k, stride, pad, dil, bias = CONVS[case]
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups,
                     bias=bias).double()
    x = torch.randn(3, cin, 11, 10, dtype=torch.float64)
    backprops = torch.randn_like(conv(x))
    expected = _autograd_norms(conv, x, backprops)
    # Act
    norms = conv2d_norm_sample(conv, [x], backprops, rule=rule)
    # Assert: one (3,) norm per parameter, equal to autograd's to float64 precision
    assert list(norms) == list(conv.parameters())
    for param, want in zip(conv.parameters(), expected):
        assert norms[param].shape == (3,) and float(want.min()) > 0.1
        torch.testing.assert_close(norms[param], want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("case", [c for c in CONVS if not isinstance(CONVS[c][5], str)])
def test_clipped_sum_of_a_conv_equals_autograd(case: str) -> None:
    # Arrange: per-sample output gradients already scaled by their clipping factors
    cin, cout, groups, k, stride, pad, dil, bias = CONVS[case]
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups,
                     bias=bias).double()
    x = torch.randn(3, cin, 11, 10, dtype=torch.float64)
    scaled = torch.randn_like(conv(x))
    expected = torch.autograd.grad((conv(x) * scaled).sum(), list(conv.parameters()))
    # Act
    sums = norm_samplers.clipped_sum(conv, x, scaled)
    # Assert: the batch's gradient of every parameter, whichever kernel formed it
    assert norm_samplers.bookkeepable(conv) and list(sums) == list(conv.parameters())
    for param, want in zip(conv.parameters(), expected):
        torch.testing.assert_close(sums[param], want, rtol=1e-10, atol=1e-12)


def test_clipped_sum_of_a_linear_layer_on_sequences_equals_autograd() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(5, 4).double()
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    scaled = torch.randn(3, 7, 4, dtype=torch.float64)
    expected = torch.autograd.grad((linear(x) * scaled).sum(), [linear.weight, linear.bias])
    sums = norm_samplers.clipped_sum(linear, x, scaled)
    torch.testing.assert_close(sums[linear.weight], expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums[linear.bias], expected[1], rtol=1e-10, atol=1e-12)


def test_cost_rule_is_bu_et_al_and_auto_follows_it(monkeypatch) -> None:
    # Arrange: hand-derived cases of 2 L^2 < p * o
    # ResNet-18 layer1 conv at 32 px: L = 8*8 = 64, p = 64*3*3 = 576, o = 64: 8192 < 36864
    assert use_ghost_norm(positions=64, inputs=576, outputs=64)
    # EfficientNet depthwise 3x3 at 16 x 16: L = 256, p = 9, o = 1: 131072 > 9
    assert not use_ghost_norm(positions=256, inputs=9, outputs=1)
    # the boundary is strict: 2 * 6^2 = 72 = 8 * 9
    assert not use_ghost_norm(positions=6, inputs=8, outputs=9)
    assert use_ghost_norm(positions=6, inputs=8, outputs=10)
    calls: list[str] = []
    ghost, inst = norm_samplers._ghost_squared, norm_samplers._grouped_squared
    monkeypatch.setattr(norm_samplers, "_ghost_squared",
                        lambda *a: calls.append("ghost") or ghost(*a))
    monkeypatch.setattr(norm_samplers, "_grouped_squared",
                        lambda *a: calls.append("grouped") or inst(*a))
    wide = nn.Conv2d(64, 64, 3, padding=1, groups=2)  # L = 16, p = 288, o = 32: 512 < 9216
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # L = 16, p = 9, o = 1: 512 > 9
    # Act
    for conv in (wide, depthwise):
        x = torch.randn(2, conv.in_channels, 4, 4)
        conv2d_norm_sample(conv, [x], torch.randn_like(conv(x)))
    # Assert
    assert calls == ["ghost", "grouped"]


def test_norm_sampler_is_registered_and_takes_an_empty_batch() -> None:
    conv = nn.Conv2d(3, 4, 3, bias=True)
    x = torch.zeros(0, 3, 6, 6)
    norms = conv2d_norm_sample(conv, [x], conv(x))
    assert GradSampleModuleFastGradientClipping.NORM_SAMPLERS[nn.Conv2d] is conv2d_norm_sample
    assert [v.shape for v in norms.values()] == [(0,), (0,)]




def _materialised_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample total gradient norms (B,) from Opacus' hooks mode (fedimg's Conv2d rule)."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        F.cross_entropy(gsm(x), y).backward()
        per_param = [p.grad_sample.flatten(1).norm(dim=1)
                     for p in model.parameters() if p.requires_grad]
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)
    return torch.stack(per_param, dim=1).norm(dim=1)


@pytest.mark.parametrize("name", zoo_params(list_models()))
def test_every_zoo_model_ghost_norms_equal_materialised_norms(name: str, monkeypatch) -> None:
    # Arrange: 3 images of 32 px; count the convs whose norms the norm sampler computes
    model = private_model(name)
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2])
    expected = _materialised_norms(model, x, y)
    seen: list[nn.Module] = []
    registry = GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    monkeypatch.setitem(registry, nn.Conv2d,
                        lambda layer, a, b: seen.append(layer) or conv2d_norm_sample(layer, a, b))
    # Act: the ghost path as DP-SGD drives it (the loop's backward, then pass 1)
    ghost = GhostClippingModule(model, max_grad_norm=1.0)
    try:
        F.cross_entropy(ghost(x), y).backward()
        actual = ghost.per_sample_norms()
    finally:
        ghost._close()
    # Assert: equal to float64 precision; every trainable conv went through the sampler,
    # so no conv gradient was materialised; the samples' norms really differ; the
    # clipped sum will come from book-keeping (only Conv2d and Linear layers train)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert len(seen) == len(convs) > 15
    assert ghost.bookkeeping
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=0)
    assert float(expected.min()) > 1e-3
    assert float(expected.max() - expected.min()) > 1e-3 * float(expected.max())


@pytest.mark.parametrize("mode", ["head", "last_k"])
def test_frozen_trunk_ghost_norms_equal_materialised_and_pass_1_stops_above_it(mode: str
                                                                            ) -> None:
    # Arrange: MobileNetV3-Small, only the new head (Linear 1024 -> 3) or it and the last
    # 2 feature blocks train
    model = build_model("mobilenet_v3_small", num_classes=3, weights="none")
    spec = MODELS.get("mobilenet_v3_small")
    model = make_inplace_free(apply_transfer(
        model, blocks=spec.blocks(model), head=spec.get_head(model),
        transfer=TransferConfig(mode=mode, bn="frozen", last_k=2))).double().train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    torch.manual_seed(1)
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2])
    expected = _materialised_norms(model, x, y)
    ghost = GhostClippingModule(model, max_grad_norm=1.0)
    # Act
    try:
        F.cross_entropy(ghost(x), y).backward()
        leaves = [tuple(t.shape) for t in ghost._leaves]
        actual = ghost.per_sample_norms()
    finally:
        ghost._close()
    # Assert: the same norms; pass 1 starts at the first trained layer's input, the
    # head's 1024 features, or the input of block 11 (96 channels at 1 x 1)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=0)
    assert leaves == ([(3, 1024)] if mode == "head" else [(3, 96, 1, 1)])


def _tiny_round(mode: str) -> tuple[nn.Module, dict[str, float], PrivacyLedger]:
    """4 noisy DP-SGD steps (sigma=1, C=0.5, class weights) of a small CNN; pieces of 3."""
    cfg = compose_config("medical", ["privacy=dp_sgd", "weights=none", "train.optimizer=sgd",
                                     "train.momentum=0", "train.weight_decay=0",
                                     "train.batch_size=8", "train.local_steps=4",
                                     "privacy.physical_batch_size=3", "privacy.max_grad_norm=0.5",
                                     f"privacy.grad_sample_mode={mode}"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    loader = InMemoryLoader(images, torch.arange(40) % 2, indices=np.arange(40), batch_size=8,
                            transform=None, shuffle=False, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, groups=2), nn.Flatten(), nn.Linear(16 * 2 * 2, 2))
    book = PrivacyLedger(target_epsilon=8.0, delta=1e-3, noise_multiplier=1.0, sample_rate=0.2)
    stats = train_private(model, loader, book, cfg=cfg, device=CPU,
                          class_weights=torch.tensor([1.0, 3.0]), lr=0.5, steps=4,
                          generator=torch.Generator().manual_seed(3))
    return model, stats, book


def test_ghost_round_takes_the_materialised_rounds_steps_and_epsilon() -> None:
    # Arrange / Act: the same Poisson batches and noise draws (one seeded generator)
    hooks, hooks_stats, hooks_book = _tiny_round("hooks")
    ghost, ghost_stats, ghost_book = _tiny_round("ghost_mixed")
    # Assert: the same weights, metrics, clipped fraction, accountant history and epsilon
    for a, b in zip(hooks.parameters(), ghost.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert hooks_book.history == ghost_book.history == [(1.0, 0.2, 4)]
    assert ghost_book.spent() == pytest.approx(hooks_book.spent(), rel=1e-12)
    assert ghost_book.spent() > 0
    for key in ("train/loss", "train/accuracy", "train/samples", "dp/clipped_fraction"):
        assert ghost_stats[key] == pytest.approx(hooks_stats[key], rel=1e-6), key


@pytest.mark.parametrize("sigma", [0.0, 0.5])
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_one_zoo_step_clipped_weighted_noised_equals_materialised(name: str,
                                                                  sigma: float) -> None:
    # Arrange: C = 0.05 clips every sample; weights after clipping; noise seeded
    base = private_model(name)
    torch.manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    cfg = {m: compose_config("medical", ["privacy=dp_sgd", "weights=none", f"model={name}",
                                         "train.optimizer=sgd", "train.momentum=0",
                                         "train.weight_decay=0", "privacy.max_grad_norm=0.05",
                                         f"privacy.grad_sample_mode={m}"])
           for m in ("hooks", "ghost_mixed")}
    after, updates = {}, {}
    for mode in cfg:
        model = copy.deepcopy(base)
        module, opt = make_private(model, cfg=cfg[mode], lr=1.0, noise_multiplier=sigma,
                                   expected_batch_size=4, device=CPU,
                                   generator=torch.Generator().manual_seed(5))
        opt.sample_weights = torch.tensor([1.0, 0.5, 1.0, 0.25], dtype=torch.float64)
        # Act: make_private puts the model in train mode: the same dropout masks for both
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        F.cross_entropy(module(x), y).backward()
        opt.step()
        module._close()
        after[mode] = (opt.samples_seen, opt.samples_clipped)
        updates[mode] = torch.cat([(b - a).flatten() for a, b in
                                   zip(model.parameters(), base.parameters())])
    # Assert: all 4 clipped in both; the same update. Without noise its norm is at most
    # C * (1 + 0.5 + 1 + 0.25) / 4 = 0.034 (the weighted clipped sum over the batch of 4)
    assert after["hooks"] == after["ghost_mixed"] == (4, 4)
    torch.testing.assert_close(updates["ghost_mixed"], updates["hooks"], rtol=1e-9, atol=1e-12)
    norm = float(updates["hooks"].norm())
    assert (0.005 < norm <= 0.0344) if sigma == 0 else norm > 1.0


def _small_cnn(kind: str) -> nn.Module:
    """Conv2d and Linear only (book-keeping), or with a 'same'-padded conv and a GroupNorm
    (Opacus' second backward pass), 8 px inputs, 2 classes."""
    torch.manual_seed(0)
    if kind == "bookkeeping":
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(6, 6, 3, stride=2, groups=6), nn.Flatten(),
                             nn.Linear(6 * 3 * 3, 2))
    return nn.Sequential(nn.Conv2d(3, 6, 4, padding="same"), nn.GroupNorm(2, 6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, groups=3), nn.Flatten(),
                         nn.Linear(6 * 3 * 3, 2))


@pytest.mark.parametrize("kind", ["bookkeeping", "second_pass"])
def test_steps_with_empty_poisson_batches_equal_the_materialised_path(kind: str) -> None:
    # Arrange: batches of 0, 3, 0 and 2 samples, sigma = 1, C = 0.1, the same generator
    sizes, after = (0, 3, 0, 2), {}
    for mode in ("hooks", "ghost_mixed"):
        model = _small_cnn(kind)
        cfg = compose_config("medical", ["privacy=dp_sgd", "weights=none", "train.optimizer=sgd",
                                         "train.momentum=0", "train.weight_decay=0",
                                         "privacy.max_grad_norm=0.1",
                                         f"privacy.grad_sample_mode={mode}"])
        module, opt = make_private(model, cfg=cfg, lr=1.0, noise_multiplier=1.0,
                                   expected_batch_size=4, device=CPU,
                                   generator=torch.Generator().manual_seed(1))
        if mode == "ghost_mixed":
            assert module.bookkeeping == (kind == "bookkeeping")
        torch.manual_seed(3)
        # Act
        for b in sizes:
            x, y = torch.randn(b, 3, 8, 8), torch.arange(b) % 2
            opt.zero_grad(set_to_none=True)
            (F.cross_entropy(module(x), y, reduction="sum") / max(b, 1)).backward()
            opt.step()
        module._close()
        after[mode] = (torch.cat([p.detach().flatten() for p in model.parameters()]),
                       opt.samples_seen)
    # Assert: the same weights after four noisy steps; 5 samples clipped and counted
    torch.testing.assert_close(after["ghost_mixed"][0], after["hooks"][0], rtol=1e-5, atol=1e-6)
    assert after["hooks"][1] == after["ghost_mixed"][1] == 5
