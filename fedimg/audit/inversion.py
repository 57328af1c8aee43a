"""Gradient-inversion audit of one client update (plain torch).

How much of a client's training batch can a curious server rebuild from the
gradient the client sends? The attack follows "Inverting Gradients - How easy
is it to break privacy in federated learning?" (Geiping et al., NeurIPS 2020):
dummy images are optimised with Adam on signed gradients so that their gradient
has maximal cosine similarity with the observed one, plus a total-variation
prior, with step decay at 3/8, 5/8 and 7/8 of the steps and the images boxed to
the valid pixel range. It refines "Deep Leakage from Gradients" (DLG, Zhu et
al., NeurIPS 2019), and the labels are first read off the last linear layer's
gradient as in iDLG (Zhao et al., "iDLG: Improved Deep Leakage from
Gradients", arXiv 2001.02610, 2020), so only images are optimised.

:func:`audit_update` runs the whole audit on a batch, optionally releasing the
gradient as DP-SGD would (per-example clipping, Gaussian noise), and scores the
reconstruction with PSNR and SSIM (Wang et al., "Image Quality Assessment: From
Error Visibility to Structural Similarity", IEEE TIP 2004). SSIM comes from
scikit-image when it is installed, else from the torch implementation here,
which matches it (11x11 Gaussian window, sigma 1.5). The model's parameters,
``.grad`` and train/eval flags are left as they were; every forward pass runs in
eval mode (BatchNorm uses its running statistics).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedimg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fedimg.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

Stats = Sequence[float]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then restore every module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable parameters, so a client sends no "
                         "gradient to invert; unfreeze at least the head")
    return params


def client_gradients(model: nn.Module, images: Tensor, labels: Tensor) -> list[Tensor]:
    """Gradient of the mean cross-entropy on (images (B, C, H, W), labels (B,)).

    One tensor per trainable parameter, in ``model.parameters()`` order; computed
    with :func:`torch.autograd.grad`, so no ``.grad`` is touched.
    """
    params = _trainable(model)
    with _eval_mode(model):
        grads = torch.autograd.grad(F.cross_entropy(model(images), labels), params)
    return [g.detach() for g in grads]


# ------------------------------------------------------------------------- labels


def _last_linear_grads(gradients: Sequence[Tensor], model: nn.Module
                       ) -> tuple[Tensor, Tensor | None]:
    """The (weight, bias) gradient of the last trainable ``nn.Linear``."""
    params = _trainable(model)
    if len(gradients) != len(params):
        raise ModelError(f"got {len(gradients)} gradients for {len(params)} trainable "
                         f"parameters; pass client_gradients(model, ...) of this model")
    index = {id(p): i for i, p in enumerate(params)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in index]
    if not linears:
        raise ModelError("label inference reads the last trainable nn.Linear (the head); "
                         "this model has none")
    head = linears[-1]
    has_bias = head.bias is not None and id(head.bias) in index
    bias = gradients[index[id(head.bias)]] if has_bias else None
    return gradients[index[id(head.weight)]], bias


def infer_labels(gradients: Sequence[Tensor], model: nn.Module, batch_size: int) -> Tensor:
    """Labels (B,) of the batch behind ``gradients``, read from the head's gradient.

    The bias gradient of class k is (sum_i p_ik - n_k) / B for n_k examples of class
    k: negative only for classes in the batch, and n_k >= -B * grad_k. Batch 1
    (iDLG): the most negative class (without a bias: the weight row of smallest sum,
    exact for non-negative features). B > 1, a heuristic: each class with a negative
    bias gradient gets max(1, ceil(-B * grad_k)) slots, leftovers go round-robin to
    them, most negative first; without a bias, the B rows of smallest sum (distinct
    labels, as in Geiping et al.'s code). Sorted; may miss confidently-fit classes.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    weight_grad, bias_grad = _last_linear_grads(gradients, model)
    row_sum = weight_grad.detach().sum(dim=1)  # (K,)
    if bias_grad is None:
        order = torch.argsort(row_sum)
        return order[torch.arange(batch_size) % order.numel()].sort().values
    g = bias_grad.detach().double()  # (K,)
    order = torch.argsort(g)
    present = [int(k) for k in order if g[k] < 0] or [int(order[0])]
    counts = {k: max(1, math.ceil(-batch_size * float(g[k]) - 1e-6)) for k in present}
    labels = [k for k in present for _ in range(counts[k])][:batch_size]
    labels += [present[i % len(present)] for i in range(batch_size - len(labels))]
    return torch.tensor(sorted(labels), dtype=torch.long, device=weight_grad.device)


# ---------------------------------------------------------------------- inversion


def _channel_stats(stats: Stats, channels: int, like: Tensor) -> Tensor:
    t = torch.as_tensor(stats, dtype=like.dtype, device=like.device).flatten()
    if t.numel() not in (1, channels):
        raise ConfigError(f"mean/std have {t.numel()} values for {channels}-channel images; "
                          f"give 1 or {channels} (the normalisation of the data pipeline)")
    return t.expand(channels).view(1, channels, 1, 1)


def _cosine_loss(trial: Sequence[Tensor], target: Sequence[Tensor]) -> Tensor:
    """1 - cosine similarity of the two gradients, each flattened over all layers."""
    dot = sum((a * b).sum() for a, b in zip(trial, target))
    n_trial = sum(a.pow(2).sum() for a in trial)
    n_target = sum(b.pow(2).sum() for b in target)
    return 1 - dot / (n_trial.sqrt() * n_target.sqrt() + 1e-12)


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels, across plus down."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()
    return dx + dy


def _reconstruct_once(model: nn.Module, target: list[Tensor], labels: Tensor, x: Tensor, *,
                      steps: int, lr: float, tv_weight: float, box: tuple[Tensor, Tensor]
                      ) -> tuple[Tensor, float]:
    """One Adam run from the start images ``x``; returns (images, final gradient loss)."""
    params = _trainable(model)
    x = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    for _ in range(steps):
        trial = torch.autograd.grad(F.cross_entropy(model(x), labels), params, create_graph=True)
        loss = _cosine_loss(trial, target) + tv_weight * total_variation(x)
        (x.grad,) = torch.autograd.grad(loss, [x])
        x.grad.sign_()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, box[1]), box[0]))
    trial = torch.autograd.grad(F.cross_entropy(model(x), labels), params)
    return x.detach(), float(_cosine_loss(trial, target))


def invert_gradients(model: nn.Module, target_grads: Sequence[Tensor], labels: Tensor,
                     image_shape: tuple[int, int, int], *, steps: int = 4800, lr: float = 0.1,
                     tv_weight: float = 1e-4, seed: int = 0, mean: Stats = IMAGENET_MEAN,
                     std: Stats = IMAGENET_STD, restarts: int = 1) -> Tensor:
    """Normalised images (B, C, H, W) whose gradient best matches ``target_grads``.

    ``labels`` (B,) fixes the batch size (use :func:`infer_labels`). Starts from
    N(0, 1) noise (seeded), keeps the best of ``restarts`` runs by final
    gradient loss. 4800 steps is the paper's setting; small models need fewer.
    """
    if steps < 1 or restarts < 1:
        raise ConfigError(f"steps={steps}, restarts={restarts}: both must be >= 1")
    target = [g.detach() for g in target_grads]
    ref = target[0]
    m, s = _channel_stats(mean, image_shape[0], ref), _channel_stats(std, image_shape[0], ref)
    generator = torch.Generator().manual_seed(seed)
    best, best_loss = None, math.inf
    with _eval_mode(model):
        for attempt in range(restarts):
            start = torch.randn((labels.shape[0], *image_shape), generator=generator).to(ref)
            try:
                x, loss = _reconstruct_once(model, target, labels, start, steps=steps, lr=lr,
                                            tv_weight=tv_weight, box=(-m / s, (1 - m) / s))
            except RuntimeError as err:  # e.g. "derivative for aten::hardsigmoid_backward ..."
                if "not implemented" not in str(err):
                    raise
                raise ModelError(f"inversion needs second derivatives, and an op of this "
                                 f"model has none ({err}); audit a model without it "
                                 f"(MobileNetV3's Hardswish/Hardsigmoid lack them)") from err
            log.debug("inversion restart %d/%d: gradient loss %.4g", attempt + 1, restarts, loss)
            if loss < best_loss or best is None:
                best, best_loss = x, loss
    return best


# ------------------------------------------------------------------------ quality


def denormalize(images: Tensor, *, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD
                ) -> Tensor:
    """Normalised (B, C, H, W) -> float64 pixels in [0, 1] (clamped), detached, on the CPU."""
    x = images.detach().cpu().double()
    c = x.shape[1]
    return (x * _channel_stats(std, c, x) + _channel_stats(mean, c, x)).clamp(0, 1)


def _batched(original: Tensor, reconstruction: Tensor) -> tuple[Tensor, Tensor]:
    a, b = original.detach().cpu().double(), reconstruction.detach().cpu().double()
    a, b = (a[None], b[None]) if a.ndim == 3 else (a, b)
    if a.shape != b.shape or a.ndim != 4:
        raise ConfigError(f"images must both be (C, H, W) or (B, C, H, W) of one shape; got "
                          f"{tuple(original.shape)} and {tuple(reconstruction.shape)}")
    return a, b


def psnr(original: Tensor, reconstruction: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1], averaged over the batch.

    Identical images give inf.
    """
    a, b = _batched(original, reconstruction)
    mse = (a - b).pow(2).flatten(1).mean(1)  # (B,)
    return float((10 * torch.log10(1 / mse)).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-r.pow(2) / (2 * sigma**2))
    w = w / w.sum()
    return (w[:, None] * w[None, :])[None, None]  # (1, 1, size, size)


def ssim_torch(original: Tensor, reconstruction: Tensor) -> float:
    """SSIM of images in [0, 1] (Wang et al. 2004), mean over pixels, channels, batch.

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population (co)variances,
    valid region only: scikit-image's ``structural_similarity(gaussian_weights=True,
    use_sample_covariance=False, data_range=1)`` gives the same numbers.
    """
    a, b = _batched(original, reconstruction)
    if min(a.shape[-2:]) < 11:
        raise ConfigError(f"SSIM needs images of at least 11x11 pixels; got {tuple(a.shape)}")
    n, c = a.shape[:2]
    a, b = a.reshape(n * c, 1, *a.shape[-2:]), b.reshape(n * c, 1, *b.shape[-2:])
    w = _gaussian_window()
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / (mu_a**2 + mu_b**2 + c1) / (var_a + var_b + c2)
    return float(s.mean())


def ssim(original: Tensor, reconstruction: Tensor) -> float:
    """SSIM of images in [0, 1], averaged over the batch (scikit-image if installed)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return ssim_torch(original, reconstruction)
    a, b = _batched(original, reconstruction)
    values = [structural_similarity(x.numpy(), y.numpy(), channel_axis=0, data_range=1.0,
                                    gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False) for x, y in zip(a, b)]
    return float(np.mean(values))


def match_order(original: Tensor, reconstruction: Tensor) -> Tensor:
    """``reconstruction`` reordered to pair with ``original`` at least total squared
    error (Hungarian algorithm): the attack recovers a batch only up to order."""
    from scipy.optimize import linear_sum_assignment

    a, b = _batched(original, reconstruction)
    cost = torch.cdist(a.flatten(1), b.flatten(1)).pow(2)  # (B, B)
    _, columns = linear_sum_assignment(cost.numpy())
    return reconstruction[torch.as_tensor(columns, device=reconstruction.device)]


# ------------------------------------------------------------------ audit and figure


def save_comparison(original: Tensor, reconstruction: Tensor, path: str | Path, *,
                    mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD,
                    titles: Sequence[str] | None = None) -> Path:
    """PNG grid: normalised originals (B, C, H, W) on top, reconstructions below.

    Each reconstruction is titled with its PSNR and SSIM; ``titles`` (B strings)
    replaces the default "original i" titles of the top row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top, bottom = _batched(denormalize(original, mean=mean, std=std),
                           denormalize(reconstruction, mean=mean, std=std))
    n = top.shape[0]
    titles = list(titles) if titles is not None else [f"original {i}" for i in range(n)]
    if len(titles) != n:
        raise ConfigError(f"got {len(titles)} titles for {n} images; give one per image")
    fig = Figure(figsize=(2.2 * n, 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        quality = "PSNR {:.1f} dB, SSIM {:.2f}".format(*_quality(top[i], bottom[i]))
        for row, (image, title) in enumerate([(top[i], titles[i]), (bottom[i], quality)]):
            ax = axes[row][i]
            pixels = image.permute(1, 2, 0).numpy()
            ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                      cmap="gray" if pixels.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _quality(original: Tensor, reconstruction: Tensor) -> tuple[float, float]:
    """PSNR and SSIM of images in [0, 1]; SSIM is NaN below its 11x11 window."""
    small = min(original.shape[-2:]) < 11
    return psnr(original, reconstruction), math.nan if small else ssim(original, reconstruction)


def release_gradient(model: nn.Module, images: Tensor, labels: Tensor, *,
                     clip_norm: float | None = None, noise_std: float = 0.0,
                     seed: int = 0) -> list[Tensor]:
    """The batch gradient as a DP-SGD client would release it.

    Without ``clip_norm``: :func:`client_gradients`. With it, each example's
    gradient is clipped to L2 norm ``clip_norm`` before averaging. Then
    N(0, noise_std^2) noise is added to every coordinate of the average; DP-SGD
    with noise multiplier z and batch B corresponds to noise_std = z * clip_norm / B.
    """
    if (clip_norm is not None and clip_norm <= 0) or noise_std < 0:
        raise ConfigError(f"clip_norm={clip_norm}, noise_std={noise_std}: need clip_norm > 0 "
                          f"(or None) and noise_std >= 0")
    if clip_norm is None:
        grads = client_gradients(model, images, labels)
    else:
        grads = [torch.zeros_like(p) for p in _trainable(model)]
        for i in range(images.shape[0]):
            g = client_gradients(model, images[i:i + 1], labels[i:i + 1])
            norm = torch.sqrt(sum(x.pow(2).sum() for x in g))
            scale = min(1.0, clip_norm / (float(norm) + 1e-12)) / images.shape[0]
            grads = [acc + scale * x for acc, x in zip(grads, g)]
    if noise_std > 0:
        generator = torch.Generator().manual_seed(seed)
        grads = [g + noise_std * torch.randn(g.shape, generator=generator).to(g)
                 for g in grads]
    return grads


def audit_update(model: nn.Module, images: Tensor, labels: Tensor, *,
                 noise_std: float = 0.0, clip_norm: float | None = None, steps: int = 4800,
                 lr: float = 0.1, tv_weight: float = 1e-4, seed: int = 0,
                 mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD,
                 restarts: int = 1) -> dict[str, Any]:
    """Release the gradient of one batch, infer its labels, invert it and score it.

    Returns ``psnr`` and ``ssim`` (in [0, 1] pixel space, reconstructions matched
    to originals by :func:`match_order`), ``label_accuracy`` (fraction of the
    batch's label multiset recovered), ``labels`` (inferred) and
    ``reconstruction`` (normalised, in matched order, on the CPU).
    """
    released = release_gradient(model, images, labels, clip_norm=clip_norm,
                                noise_std=noise_std, seed=seed)
    inferred = infer_labels(released, model, images.shape[0])
    recon = invert_gradients(model, released, inferred, tuple(images.shape[1:]), steps=steps,
                             lr=lr, tv_weight=tv_weight, seed=seed, mean=mean, std=std,
                             restarts=restarts)
    recon = match_order(images, recon).cpu()
    truth, found = denormalize(images, mean=mean, std=std), denormalize(recon, mean=mean, std=std)
    quality = _quality(truth, found)
    result = {"psnr": quality[0], "ssim": quality[1],
              "label_accuracy": _label_accuracy(labels, inferred),
              "labels": inferred.cpu(), "reconstruction": recon}
    log.info("gradient inversion audit: PSNR %.2f dB, SSIM %.3f, label accuracy %.2f",
             result["psnr"], result["ssim"], result["label_accuracy"])
    return result


def _label_accuracy(truth: Tensor, inferred: Tensor) -> float:
    """Size of the multiset intersection of the two label lists, over the batch size."""
    hits = Counter(truth.tolist()) & Counter(inferred.tolist())
    return sum(hits.values()) / truth.numel()
