"""Vectorised clients equal sequential ones (fedimg.training.vectorized), and the rule.

Each equality test trains k=3 clients of different data (different sizes, so
different step counts and a short last batch) with ``train_vectorized`` and with
``train_local`` run alone from the same weights and seed, and compares every trained
tensor, every BatchNorm buffer and every metric.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedimg.config import TrainConfig, TransferConfig
from fedimg.data.loader import InMemoryLoader
from fedimg.data.transforms import build_transform
from fedimg.models import build_model
from fedimg.models.split import split_model
from fedimg.training.loop import train_local
from fedimg.training.vector_rule import VectorizeRule, train_clients
from fedimg.training.vectorized import (
    ClientJob,
    VectorizeRefused,
    _sgd,
    refusal,
    train_sequential,
    train_vectorized,
)

CPU = torch.device("cpu")
CLASSES = 5
SIZES = (16, 12, 9)  # samples per client: batches of 8 -> 2, 2 and 1 (a lone 9th joins)


def _lite_last_k() -> nn.Module:
    """EfficientNet-Lite0, last 2 blocks + head trainable, BatchNorm there in train mode."""
    torch.manual_seed(0)
    return build_model("efficientnet_lite0", num_classes=CLASSES, weights="pretrained",
                       transfer=TransferConfig(mode="last_k", last_k=2, bn="train"))


def _loader(n: int, seed: int, *, augment: str = "light", size: int = 32) -> InMemoryLoader:
    """``n`` smooth random uint8 images of client ``seed`` (4x4 noise, upsampled: no
    white noise, whose pretrained activations are huge); "light" augmentation draws
    from the global generator."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 255
    images = F.interpolate(coarse, size=size, mode="bilinear").to(torch.uint8)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return InMemoryLoader(images, labels, indices=np.arange(n), batch_size=8,
                          transform=build_transform(augment, image_size=size, train=True),
                          shuffle=True, seed=seed)


def _jobs(make_loader) -> list[ClientJob]:  # noqa: ANN001
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5])
    scale = torch.tensor([1.0, 0.5, 1.0, 0.5, 1.0])
    shift = torch.tensor([-0.1, -0.3, 0.0, -0.2, -0.5])  # FedLC-like, every class present
    return [ClientJob(make_loader(SIZES[0], 1), seed=101, class_weights=weights),
            ClientJob(make_loader(SIZES[1], 2), seed=102, logit_shift=shift),
            ClientJob(make_loader(SIZES[2], 3), seed=103, logit_scale=scale)]


def _reference(model: nn.Module, jobs: list[ClientJob], *, cfg: TrainConfig,
               mu: float = 0.0) -> list[tuple[dict, dict]]:
    """train_local for each job alone: (its metrics, its state dict)."""
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    for job in jobs:
        model.load_state_dict(initial)
        torch.manual_seed(job.seed)
        result = train_local(model, job.loader, cfg=cfg, lr=cfg.lr, device=CPU,
                             proximal_mu=mu, class_weights=job.class_weights,
                             logit_scale=job.logit_scale, logit_shift=job.logit_shift)
        out.append((result.as_metrics(), {k: v.clone() for k, v in model.state_dict().items()}))
    model.load_state_dict(initial)
    return out


def _assert_equal(outcomes, reference) -> None:  # noqa: ANN001
    for outcome, (metrics, state) in zip(outcomes, reference, strict=True):
        for name, value in outcome.state.items():
            # parameters: 1e-5 absolute; BatchNorm statistics (running variances of
            # pretrained features reach ~200, one float32 ulp there is 1.5e-5): 1e-5 of
            # the tensor's largest magnitude
            diff = (value.double() - state[name].double()).abs().max().item()
            scale = max(1.0, state[name].double().abs().max().item()) if "running" in name else 1.0
            assert diff < 1e-5 * scale, f"{name} differs by {diff}"
        got = outcome.result.as_metrics()
        assert got.keys() == metrics.keys()
        for key in ("train/loss", "train/first_loss", "train/last_loss"):
            assert got[key] == pytest.approx(metrics[key], abs=1e-5)
        assert got["train/accuracy"] == metrics["train/accuracy"]
        assert got["train/steps"] == metrics["train/steps"]


def test_last_k_efficientnet_clients_equal_sequential_ones():
    # Arrange: dropout before the head and stochastic depth in the frozen blocks draw
    # noise; augmentation draws too; BatchNorm of the last 2 blocks trains.
    model, cfg = _lite_last_k(), TrainConfig(local_epochs=1, lr=0.05, weight_decay=1e-3)
    reference = _reference(model, _jobs(_loader), cfg=cfg)

    # Act
    outcomes = train_vectorized(model, _jobs(_loader), cfg=cfg, lr=cfg.lr, device=CPU)

    # Assert: 16, 12, 9 samples in batches of 8 -> 2, 2, 1 steps (a lone 9th sample
    # joins its batch); the trained tensors include BatchNorm statistics
    assert [o.result.steps for o in outcomes] == [2, 2, 1]
    assert any("running_mean" in n for n in outcomes[0].state)
    _assert_equal(outcomes, reference)


def test_feature_cache_tail_with_fedprox_equals_sequential_over_two_epochs():
    # Arrange: the tail after the frozen trunk, on the trunk's features computed once
    split = split_model(_lite_last_k(), probe=torch.randn(2, 3, 32, 32))

    def features(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.no_grad():
            return [(split.trunk(x), y) for x, y in _loader(n, seed, augment="none")]

    cfg = TrainConfig(local_epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-4)
    reference = _reference(split.tail, _jobs(features), cfg=cfg, mu=0.5)

    # Act
    outcomes = train_vectorized(split.tail, _jobs(features), cfg=cfg, lr=cfg.lr, device=CPU,
                                proximal_mu=0.5)

    # Assert: 2 epochs of 2, 2, 1 batches
    assert [o.result.steps for o in outcomes] == [4, 4, 2]
    _assert_equal(outcomes, reference)


def test_sgd_matches_two_steps_by_hand():
    # Arrange: w = 1, gradient 0.5 twice, weight decay 0.1, momentum 0.9, lr 0.1
    cfg = TrainConfig(momentum=0.9, weight_decay=0.1)
    w, m, g = {"w": torch.tensor([1.0])}, {"w": torch.zeros(1)}, {"w": torch.tensor([0.5])}

    # Act
    w, m = _sgd(w, g, m, cfg=cfg, lr=0.1)
    first = float(w["w"])
    w, m = _sgd(w, g, m, cfg=cfg, lr=0.1)

    # Assert: d = 0.5 + 0.1 = 0.6, m = 0.6, w = 0.94; then d = 0.5 + 0.094 = 0.594,
    # m = 0.54 + 0.594 = 1.134, w = 0.94 - 0.1134 = 0.8266
    assert first == pytest.approx(0.94)
    assert float(m["w"]) == pytest.approx(1.134)
    assert float(w["w"]) == pytest.approx(0.8266)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def _tiny_jobs(k: int = 2) -> list[ClientJob]:
    g = torch.Generator().manual_seed(0)
    return [ClientJob([(torch.randn(4, 3, 4, 4, generator=g), torch.tensor([0, 1, 0, 1]))],
                      seed=i) for i in range(k)]


@pytest.mark.parametrize(("vectorised_s", "expected"), [(0.5, True), (5.0, False)])
def test_rule_picks_the_faster_path_on_a_fake_timer(vectorised_s, expected):
    # Arrange: each sequential step "takes" 1 s; one step of 3 clients 0.5 s or 5 s
    ticks = itertools.accumulate([0.0, 1.0, 0.0, 1.0, 0.0, vectorised_s, 0.0, vectorised_s])
    rule = VectorizeRule(clock=ticks.__next__)
    model = _linear()

    # Act
    decision = rule.decide(model, k=3, batch_shape=(4, 3, 4, 4), num_classes=2,
                           cfg=TrainConfig(), device=CPU)
    again = rule.decide(model, k=3, batch_shape=(4, 3, 4, 4), num_classes=2,
                        cfg=TrainConfig(), device=CPU)  # cached: the clock is spent

    # Assert: sequential = 3 clients x 1 s = 3 s, against 0.5 s or 5 s
    assert decision.sequential_s == 3.0
    assert decision.vectorized_s == vectorised_s
    assert decision.vectorize is expected
    assert again == decision


def test_rule_probe_leaves_model_and_random_state_untouched():
    # Arrange
    model, rule = _linear(), VectorizeRule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    # Act
    rule.decide(model, k=2, batch_shape=(4, 3, 4, 4), num_classes=2, cfg=TrainConfig(),
                device=CPU)

    # Assert
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(("model", "cfg", "reason"), [
    (_linear(), TrainConfig(optimizer="adamw"), "train.optimizer=adamw"),
    (nn.Sequential(nn.Dropout2d(0.1), _linear()), TrainConfig(), "random layers 0"),
    (nn.Sequential(nn.Dropout(1.0), _linear()), TrainConfig(), "random layers 0"),
])
def test_ineligible_configs_are_refused_and_fall_back(model, cfg, reason):
    # Arrange: a rule whose clock must never be read
    def no_clock() -> float:
        raise AssertionError("an ineligible cohort must not be timed")

    # Act
    found = refusal(model, cfg=cfg, device=CPU)
    outcomes = train_clients(model, _tiny_jobs(), cfg=cfg, lr=0.1, device=CPU,
                             batch_shape=(4, 3, 4, 4), num_classes=2,
                             rule=VectorizeRule(clock=no_clock))

    # Assert: refused with a reason, trained one by one like train_sequential
    assert reason in found
    with pytest.raises(VectorizeRefused, match="cannot train 2 clients vectorised"):
        train_vectorized(model, _tiny_jobs(), cfg=cfg, lr=0.1, device=CPU)
    expected = train_sequential(model, _tiny_jobs(), cfg=cfg, lr=0.1, device=CPU)
    for got, want in zip(outcomes, expected, strict=True):
        assert got.result.loss == want.result.loss
        assert all(torch.equal(got.state[k], want.state[k]) for k in want.state)


def test_a_dp_hook_is_refused():
    assert "DP-SGD" in refusal(_linear(), cfg=TrainConfig(), device=CPU, hook=object())
