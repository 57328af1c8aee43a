"""train_local and evaluate on a tiny, linearly separable image problem."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from fedimg.config import TrainConfig
from fedimg.errors import DataError
from fedimg.training import TrainResult, evaluate, train_local
from fedimg.training import loop
from fedimg.training.loop import TrainingDiverged

CPU = torch.device("cpu")
PIXELS = 3 * 4 * 4  # images are (3, 4, 4)


def _batches(num_batches: int = 3, batch_size: int = 8, seed: int = 0) -> list:
    """Class 0 images are about -1 everywhere, class 1 images about +1 (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        y = torch.arange(batch_size) % 2  # (B,) 0,1,0,1,...
        noise = 0.3 * torch.randn(batch_size, 3, 4, 4, generator=g)
        x = (2.0 * y - 1.0).view(-1, 1, 1, 1) + noise  # (B, 3, 4, 4)
        batches.append((x, y))
    return batches


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 2))


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_loss_falls_on_a_separable_problem():
    # Arrange
    model, cfg = _cnn(), TrainConfig(local_epochs=5, lr=0.05)

    # Act
    result = train_local(model, _batches(), cfg=cfg, lr=cfg.lr, device=CPU)

    # Assert: first/last loss are means over the first and the fifth epoch.
    assert isinstance(result, TrainResult)
    assert result.last_loss < 0.5 * result.first_loss
    assert (result.steps, result.num_examples) == (5 * 3, 5 * 3 * 8)
    assert result.first_loss >= result.loss >= result.last_loss
    assert 0.0 <= result.accuracy <= 1.0 and result.seconds > 0


def test_local_steps_runs_exactly_that_many_optimizer_steps():
    # Arrange: 3 batches per epoch, 7 steps -> 2 full epochs plus 1 batch.
    steps_seen = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps_seen.append(1))
    cfg = TrainConfig(local_epochs=99, local_steps=7)

    # Act
    try:
        result = train_local(_linear(), _batches(), cfg=cfg, lr=0.01, device=CPU)
    finally:
        handle.remove()

    # Assert
    assert len(steps_seen) == 7
    assert (result.steps, result.num_examples) == (7, 7 * 8)


def test_fedprox_with_large_mu_stays_near_the_global_weights():
    # Arrange: plain SGD; lr * mu = 0.5 pulls half of the drift back every step.
    cfg = TrainConfig(local_steps=20, momentum=0.0, weight_decay=0.0)
    plain, prox = _linear(), _linear()
    start = _flat(plain)

    # Act
    train_local(plain, _batches(), cfg=cfg, lr=0.1, device=CPU, proximal_mu=0.0)
    train_local(prox, _batches(), cfg=cfg, lr=0.1, device=CPU, proximal_mu=5.0)

    # Assert
    drift_plain = (_flat(plain) - start).norm()
    drift_prox = (_flat(prox) - start).norm()
    assert drift_prox < 0.5 * drift_plain


def test_frozen_parameters_do_not_change():
    # Arrange: freeze the conv layer; weight decay and momentum would move it if included.
    model = _cnn()
    conv = model[0]
    conv.requires_grad_(False)
    conv_before = [p.clone() for p in conv.parameters()]
    head_before = model[5].weight.clone()
    cfg = TrainConfig(local_steps=5, weight_decay=0.1, momentum=0.9)

    # Act
    train_local(model, _batches(), cfg=cfg, lr=0.1, device=CPU)

    # Assert
    assert all(torch.equal(a, b) for a, b in zip(conv_before, conv.parameters()))
    assert not torch.equal(head_before, model[5].weight)


def test_nan_loss_raises_training_diverged_naming_step_and_lr():
    # Arrange: the second batch contains a NaN pixel.
    batches = _batches()
    batches[1][0][0, 0, 0, 0] = float("nan")
    cfg = TrainConfig(local_steps=3)

    # Act / Assert
    with pytest.raises(TrainingDiverged, match=r"step 2 with lr=0.01.*train.lr") as info:
        train_local(_linear(), batches, cfg=cfg, lr=0.01, device=CPU)
    assert info.value.exit_code == 7


def test_empty_training_loader_is_a_data_error():
    with pytest.raises(DataError, match="no batches"):
        train_local(_linear(), [], cfg=TrainConfig(), lr=0.01, device=CPU)


def test_evaluate_on_a_perfect_classifier():
    # Arrange: logits = (-48w, +48w) for x = +1 and the reverse for x = -1, so the
    # correct class always leads by 96w = ln 3 and the loss is ln(1 + 1/3) = ln(4/3).
    model = _linear()
    w = math.log(3) / 96
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-w * torch.ones(PIXELS), w * torch.ones(PIXELS)]))
        model[1].bias.zero_()
    y = torch.tensor([0, 1, 0, 1])
    batches = [((2.0 * y - 1.0).view(-1, 1, 1, 1).expand(-1, 3, 4, 4), y)] * 2
    model.train()

    # Act
    metrics = evaluate(model, batches, device=CPU, num_classes=2)

    # Assert
    assert metrics["accuracy"] == 1.0 and metrics["auc"] == 1.0
    assert metrics["balanced_accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert metrics["loss"] == pytest.approx(math.log(4 / 3), rel=1e-5)
    assert metrics["num_examples"] == 8
    assert model.training  # mode restored


def test_evaluate_empty_loader():
    assert evaluate(_linear(), [], device=CPU, num_classes=2) == {"num_examples": 0}


def test_bf16_autocast_and_channels_last_code_path_runs_when_forced_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
):
    # Arrange: these speed-ups are CUDA-only; force them on to exercise the code path.
    monkeypatch.setattr(loop, "amp_dtype", lambda device, enabled: torch.bfloat16)
    monkeypatch.setattr(loop, "use_channels_last", lambda device, enabled: True)
    model, cfg = _cnn(), TrainConfig(local_steps=4)

    # Act
    result = train_local(model, _batches(), cfg=cfg, lr=0.05, device=CPU)

    # Assert
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert result.steps == 4 and math.isfinite(result.loss)


def test_channels_last_leaves_flat_cached_features_alone(monkeypatch: pytest.MonkeyPatch):
    # Arrange: channels_last forced on (CUDA's default); a head trained on (B, 48)
    # features, as the feature cache feeds it, has no 4-D input to reformat
    monkeypatch.setattr(loop, "use_channels_last", lambda device, enabled: True)
    features = [(x.flatten(1), y) for x, y in _batches()]  # (8, 48) each
    head = nn.Linear(PIXELS, 2)
    # Act
    result = train_local(head, features, cfg=TrainConfig(local_steps=3), lr=0.05, device=CPU)
    # Assert
    assert result.steps == 3 and math.isfinite(result.loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_and_channels_last_smoke():
    # Arrange
    device = torch.device("cuda")
    model = _cnn()
    cfg = TrainConfig(local_steps=6, amp=True, channels_last=True, lr=0.05)

    # Act
    result = train_local(model, _batches(), cfg=cfg, lr=cfg.lr, device=device)
    metrics = evaluate(model, _batches(seed=1), device=device, num_classes=2, amp=True)

    # Assert
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert result.steps == 6 and math.isfinite(result.loss)
    assert metrics["num_examples"] == 24 and 0.0 <= metrics["accuracy"] <= 1.0


def test_restricted_softmax_scales_the_logits_of_absent_classes():
    # Arrange: a 3-class linear model, one batch of class-0 images only; classes 1 and 2
    # are absent at this client. With a zero-weight model every logit is its bias.
    from fedimg.training import restricted_logit_scale

    labels = torch.zeros(4, dtype=torch.long)
    scale = restricted_logit_scale(labels, 3, alpha=0.5)
    assert scale.tolist() == [1.0, 0.5, 0.5]
    model = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 2.0, 2.0]))
    batch = [(torch.zeros(4, 3, 4, 4), labels)]
    cfg = TrainConfig(local_steps=1, lr=1e-9, momentum=0.0, weight_decay=0.0)
    # Act
    plain = train_local(model, batch, cfg=cfg, lr=cfg.lr, device=CPU)
    fedrs = train_local(model, batch, cfg=cfg, lr=cfg.lr, device=CPU, logit_scale=scale)
    # Assert: CE of logits (0, 2, 2) vs (0, 1, 1) for class 0, computed by hand
    assert plain.first_loss == pytest.approx(math.log(1 + 2 * math.e ** 2), rel=1e-5)
    assert fedrs.first_loss == pytest.approx(math.log(1 + 2 * math.e), rel=1e-5)


def test_calibrated_logits_shift_present_classes_and_drop_absent_ones():
    # Arrange: 3 classes; the client holds 16 of class 0 and 1 of class 1, none of 2.
    # FedLC (Zhang et al. 2022) shifts class c by -tau * n_c^(-1/4): 16^(-1/4) = 0.5.
    from fedimg.training import calibrated_logit_shift

    labels = torch.tensor([0] * 16 + [1])
    shift = calibrated_logit_shift(labels, 3, tau=2.0)
    assert shift[:2].tolist() == [-1.0, -2.0] and shift[2] == float("-inf")
    model = nn.Sequential(nn.Flatten(), nn.Linear(PIXELS, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0, 3.0]))
    bias = model[1].bias.detach().clone()
    batch = [(torch.zeros(4, 3, 4, 4), torch.tensor([0, 0, 0, 1]))]
    cfg = TrainConfig(local_steps=1, lr=0.5, momentum=0.0, weight_decay=0.0)
    # Act
    fedlc = train_local(model, batch, cfg=cfg, lr=cfg.lr, device=CPU, logit_shift=shift)
    # Assert: shifted logits (-1, -1, -inf): each of the two classes has p = 1/2, so
    # the loss is log 2 and the absent class's bias gets no gradient
    assert fedlc.first_loss == pytest.approx(math.log(2), rel=1e-6)
    step = model[1].bias.detach() - bias  # -lr * mean(p - onehot): (-0.5*(0.5-0.75), ...)
    assert step.tolist() == pytest.approx([0.125, -0.125, 0.0], abs=1e-7)


class _TwoHalves:
    """A StepHook in plain PyTorch: every batch in two halves, their gradients summed,
    one SGD update per batch (the shape of DP-SGD's micro-batches, without Opacus)."""

    def __init__(self) -> None:
        self.updates, self.closed, self.first_half = 0, False, True

    @contextmanager
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        hook = self

        class OncePerBatch:  # zero_grad and step act on the first and second half only
            param_groups = optimizer.param_groups

            def zero_grad(self, set_to_none: bool = True) -> None:
                if hook.first_half:
                    optimizer.zero_grad(set_to_none=set_to_none)

            def step(self) -> None:
                if not hook.first_half:
                    optimizer.step()
                    hook.updates += 1

        yield model, OncePerBatch()
        self.closed = True

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor):
        half = len(y) // 2
        self.first_half = True
        yield x[:half], y[:half]
        self.first_half = False
        yield x[half:], y[half:]


def _sgd(steps: int = 6) -> TrainConfig:
    return TrainConfig(local_steps=steps, momentum=0.0, weight_decay=0.0)


def test_a_hook_feeding_halves_takes_the_same_steps_and_reports_the_same_metrics():
    # Arrange: batches of 8 in halves of 4. Each half's loss is its own mean, so the
    # summed gradient is twice the whole batch's: lr 0.05 with the hook = lr 0.1 without.
    plain, halves, hook = _linear(), _linear(), _TwoHalves()
    # Act
    ref = train_local(plain, _batches(), cfg=_sgd(), lr=0.1, device=CPU)
    got = train_local(halves, _batches(), cfg=_sgd(), lr=0.05, device=CPU, hook=hook)
    # Assert: one update per batch, the same weights, and every metric means the same
    assert hook.updates == got.steps == ref.steps == 6 and hook.closed
    assert torch.allclose(_flat(halves), _flat(plain), atol=1e-6)
    assert got.num_examples == ref.num_examples == 6 * 8
    for name in ("loss", "first_loss", "last_loss", "accuracy"):
        assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=1e-6), name


def test_under_a_hook_class_weights_weigh_the_reported_loss_not_the_gradient():
    # Arrange: class 1 weighs 3, class 0 weighs 1
    weights = torch.tensor([1.0, 3.0])
    # Act: lr=0 keeps the model fixed, so the reported losses compare directly
    plain_cw = train_local(_linear(), _batches(), cfg=_sgd(), lr=0.0, device=CPU,
                           class_weights=weights)
    hook_cw = train_local(_linear(), _batches(), cfg=_sgd(), lr=0.0, device=CPU,
                          class_weights=weights, hook=_TwoHalves())
    moved_cw, moved = _linear(), _linear()
    train_local(moved_cw, _batches(), cfg=_sgd(), lr=0.05, device=CPU, class_weights=weights,
                hook=_TwoHalves())
    train_local(moved, _batches(), cfg=_sgd(), lr=0.05, device=CPU, hook=_TwoHalves())
    # Assert: the reported loss is weighted as without a hook; the update is not (the
    # hook's optimizer weighs the samples itself, as DP-SGD's does after clipping)
    assert hook_cw.loss == pytest.approx(plain_cw.loss, rel=1e-6)
    assert torch.equal(_flat(moved_cw), _flat(moved))


def test_train_result_as_metrics_uses_the_train_keys():
    result = train_local(_linear(), _batches(), cfg=_sgd(3), lr=0.01, device=CPU)
    metrics = result.as_metrics()
    assert sorted(metrics) == ["train/accuracy", "train/first_loss", "train/last_loss",
                               "train/loss", "train/seconds", "train/steps"]
    assert metrics["train/steps"] == 3.0 and metrics["train/loss"] == result.loss
