"""Gradient inversion: hand-derived gradients and labels, image metrics, and a real
attack on a DLG-style tiny sigmoid CNN (about 6.5k parameters, 16x16 RGB)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedimg.errors import ConfigError, ModelError
from fedimg.audit.inversion import (
    audit_update,
    client_gradients,
    denormalize,
    infer_labels,
    psnr,
    release_gradient,
    save_comparison,
    ssim,
    ssim_torch,
    total_variation,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # pixels in [0, 1] <-> [-1, 1]
STEPS = 300  # enough for the tiny net (the paper's 4800 are for ResNets)


def tiny_cnn(seed: int = 1) -> nn.Module:
    """Two stride-2 5x5 convs with sigmoids and a linear head, as in DLG's LeNet."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 12, 5, padding=2, stride=2), nn.Sigmoid(),  # (B, 12, 8, 8)
        nn.Conv2d(12, 12, 5, padding=2, stride=2), nn.Sigmoid(),  # (B, 12, 4, 4)
        nn.Flatten(), nn.Linear(12 * 4 * 4, 10),
    )


def smooth_image(seed: int) -> torch.Tensor:
    """A (1, 3, 16, 16) image, normalised: random 4x4 colours upsampled bilinearly."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    pixels = F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    return (pixels - 0.5) / 0.5


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean_audit(one_thread: None) -> dict[str, Any]:
    """One noiseless audit of a single image, shared by the tests that read it."""
    model = tiny_cnn().train()  # the audit must leave the train flag alone
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = smooth_image(seed=10), torch.tensor([7])
    result = audit_update(model, images, labels, steps=STEPS, mean=MEAN, std=STD)
    return {"model": model, "before": before, "images": images, "result": result}


# ------------------------------------------------------------------- gradients, labels


def test_client_gradients_of_a_zero_linear_layer_match_hand_computation():
    # Arrange: zero weights -> p = (1/2, 1/2); label 1 -> dL/db = p - onehot = (1/2, -1/2)
    # and dL/dW = (p - onehot) x^T.
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)

    # Act
    grad_w, grad_b = client_gradients(model, x, torch.tensor([1]))

    # Assert
    assert grad_b.tolist() == pytest.approx([0.5, -0.5])
    assert grad_w.tolist() == [pytest.approx([0.5, 1.0, 1.5, 2.0]),
                               pytest.approx([-0.5, -1.0, -1.5, -2.0])]
    assert model[1].weight.grad is None and model[1].bias.grad is None


@pytest.mark.parametrize("label", [0, 3, 9])
def test_infer_labels_is_exact_for_one_image(label):
    # Arrange
    model = tiny_cnn()
    grads = client_gradients(model, smooth_image(seed=label), torch.tensor([label]))

    # Act / Assert
    assert infer_labels(grads, model, batch_size=1).tolist() == [label]


@pytest.mark.parametrize("labels", [[2, 5, 7], [4, 4, 1]])
def test_infer_labels_recovers_a_batch_on_an_untrained_net(labels):
    # Arrange: untrained -> p_k ~ 1/10, so grad_k ~ (0.3 - n_k) / 3 and
    # ceil(-3 grad_k) = n_k for the classes present.
    model = tiny_cnn()
    images = torch.cat([smooth_image(seed=s) for s in range(3)])
    grads = client_gradients(model, images, torch.tensor(labels))

    # Act / Assert
    assert infer_labels(grads, model, batch_size=3).tolist() == sorted(labels)


def test_infer_labels_without_a_bias_reads_the_weight_rows():
    # Arrange: ReLU features are >= 0, so only the true class row of dL/dW = (p - onehot) h^T
    # sums to a negative number (iDLG).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5, bias=False))
    grads = client_gradients(model, torch.randn(1, 3, 2, 2), torch.tensor([3]))

    # Act / Assert
    assert infer_labels(grads, model, batch_size=1).tolist() == [3]


def test_infer_labels_explains_a_model_without_a_trainable_head():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    grads = client_gradients(model, torch.randn(1, 3, 4, 4), torch.tensor([0]))
    with pytest.raises(ModelError, match="nn.Linear"):
        infer_labels(grads, model, batch_size=1)


def test_release_gradient_clips_then_adds_noise():
    # Arrange
    model = tiny_cnn()
    images, labels = smooth_image(seed=1), torch.tensor([2])

    # Act
    clipped = release_gradient(model, images, labels, clip_norm=1e-3)
    noisy = release_gradient(model, images, labels, noise_std=0.5, seed=3)
    plain = client_gradients(model, images, labels)

    # Assert: a batch of 1 is clipped to exactly clip_norm; noise has std 0.5.
    assert math.sqrt(sum(float(g.pow(2).sum()) for g in clipped)) == pytest.approx(1e-3)
    residual = torch.cat([(n - p).flatten() for n, p in zip(noisy, plain)])
    assert float(residual.std()) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ConfigError, match="clip_norm"):
        release_gradient(model, images, labels, clip_norm=0.0)


# ----------------------------------------------------------------------- image metrics


def test_psnr_and_ssim_of_identical_images():
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert math.isinf(psnr(image, image))
    assert ssim(image, image) == pytest.approx(1.0)
    assert ssim_torch(image, image) == pytest.approx(1.0)


def test_psnr_and_ssim_of_a_constant_shift_match_hand_computation():
    # Arrange: flat 0.4 vs flat 0.6. MSE = 0.04 -> PSNR = 10 log10(1 / 0.04) = 13.979 dB.
    # Both variances are 0, so SSIM = luminance = (2 * 0.4 * 0.6 + C1) / (0.16 + 0.36 + C1)
    # with C1 = 0.01^2.
    a, b = torch.full((1, 3, 16, 16), 0.4), torch.full((1, 3, 16, 16), 0.6)
    c1 = 1e-4

    # Act / Assert
    assert psnr(a, b) == pytest.approx(10 * math.log10(25))
    assert ssim(a, b) == pytest.approx((0.48 + c1) / (0.52 + c1))
    assert ssim_torch(a, b) == pytest.approx((0.48 + c1) / (0.52 + c1))


def test_torch_ssim_matches_scikit_image():
    pytest.importorskip("skimage")
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 20, 24, generator=gen)
    b = (a + 0.2 * torch.randn(3, 3, 20, 24, generator=gen)).clamp(0, 1)
    assert ssim_torch(a, b) == pytest.approx(ssim(a, b), abs=1e-6)


def test_total_variation_of_a_vertical_edge():
    # Arrange: columns 0 | 1 -> every horizontal step is 1, every vertical step 0.
    x = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    assert float(total_variation(x)) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the attack


def test_inversion_recovers_a_single_image(clean_audit):
    result = clean_audit["result"]
    assert result["psnr"] > 25
    assert result["ssim"] > 0.8
    assert result["label_accuracy"] == 1.0
    assert result["reconstruction"].shape == (1, 3, 16, 16)


def test_audit_leaves_the_model_untouched(clean_audit):
    model = clean_audit["model"]
    assert model.training  # restored after the eval-mode attack
    for p, before in zip(model.parameters(), clean_audit["before"]):
        assert torch.equal(p, before)
        assert p.grad is None


def test_large_noise_defeats_the_inversion(clean_audit, one_thread):
    # Arrange: per-coordinate noise std 1 on ~6.5k coordinates -> noise norm ~80,
    # against a gradient norm of a few units.
    model, images = clean_audit["model"], clean_audit["images"]
    grad_norm = math.sqrt(sum(float(g.pow(2).sum())
                              for g in client_gradients(model, images, torch.tensor([7]))))

    # Act
    noisy = audit_update(model, images, torch.tensor([7]), noise_std=1.0, steps=STEPS,
                         mean=MEAN, std=STD)

    # Assert
    assert grad_norm < 10
    assert noisy["psnr"] < 15
    assert noisy["psnr"] < clean_audit["result"]["psnr"] - 10


def test_save_comparison_writes_a_png(clean_audit, tmp_path):
    # Act
    path = save_comparison(clean_audit["images"], clean_audit["result"]["reconstruction"],
                           tmp_path / "figs" / "inversion.png", mean=MEAN, std=STD)

    # Assert
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_denormalize_inverts_the_pipeline_normalisation():
    pixels = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normalised = (pixels - m) / s
    assert torch.allclose(denormalize(normalised, mean=mean, std=std), pixels.double(), atol=1e-6)


def test_inversion_explains_ops_without_a_second_derivative():
    # Arrange: Hardsigmoid (MobileNetV3) has no double backward in torch.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardsigmoid(),  # (B, 4, 14, 14)
                          nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    images, labels = smooth_image(seed=0), torch.tensor([1])

    # Act / Assert
    with pytest.raises(ModelError, match="second derivatives"):
        audit_update(model, images, labels, steps=2, mean=MEAN, std=STD)
