"""DP-SGD at a client: clipping, accounting across rounds, budgets, micro-batches,
the metrics it shares with the plain loop, every zoo model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedimg.config.compose import compose_config
from fedimg.data import InMemoryLoader
from fedimg.models import MODELS
from fedimg.privacy.accounting import PrivacyLedger, epsilon
from fedimg.privacy.dp_sgd import (
    WeightedDPOptimizer,
    client_ledger,
    private_batches,
    steps_per_round,
    train_private,
    train_round,
)
from fedimg.clientapp.environment import TaskEnvironment
from tests.support.private_models import zoo_params

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _env(tmp_path, tiny_overrides, *extra: str) -> TaskEnvironment:
    cfg = compose_config("medical", [*tiny_overrides, "privacy=dp_sgd", "weights=none",
                                     "model=mobilenet_v3_small", "train.batch_size=16",
                                     "train.local_steps=2", "data.synthetic.train_size=128",
                                     "train.class_weighting=none",
                                     f"hydra.run.dir={tmp_path}", *extra])
    return TaskEnvironment(cfg, num_threads=2)


@pytest.mark.parametrize("scale, clipped, weight", [(100.0, True, None), (1e-4, False, None),
                                                   (100.0, True, 0.25)])
def test_noise_off_clipped_per_sample_gradient_has_norm_max_grad_norm(scale, clipped,
                                                                      weight) -> None:
    # Arrange: one sample, plain SGD with lr=1 and no momentum, sigma=0, C=0.5; an
    # optional class weight applied after clipping
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    opt = WeightedDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0,
                                  max_grad_norm=0.5, expected_batch_size=1, loss_reduction="sum")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(1, 3, 8, 8), torch.tensor([2])
    # Act
    loss = scale * nn.functional.cross_entropy(gsm(x), y, reduction="sum")
    loss.backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    opt.sample_weights = None if weight is None else torch.tensor([weight])
    opt.step()
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    # Assert: the applied gradient has norm exactly C when clipped (times the weight),
    # else its own norm
    expected = (0.5 if clipped else float(raw)) * (weight or 1.0)
    assert float(step.norm()) == pytest.approx(expected, rel=1e-4)
    assert (opt.samples_clipped, opt.samples_seen) == (int(clipped), 1)
    gsm._close()


def test_epsilon_accumulates_over_rounds_like_one_accountant(tmp_path, tiny_overrides) -> None:
    env = _env(tmp_path, tiny_overrides, "rounds=3")
    steps = steps_per_round(env.cfg, env.client(0).num_train)
    ledger, spent = None, []
    for r in (1, 2, 3):
        before = {k: v.clone() for k, v in env.state().items()}
        result = train_round(env, 0, server_round=r, ledger=ledger)
        ledger = result.ledger
        spent.append(result.metrics["dp/epsilon"])
        changed = any(not torch.equal(before[k], v) for k, v in env.state().items())
        assert changed and not result.declined
    sigma, q = ledger["noise_multiplier"], ledger["sample_rate"]
    # Assert: sigma calibrated for 3 rounds meets the budget at the end; epsilon rose each
    # round and equals one accountant run over all 3 x steps
    assert spent[0] < spent[1] < spent[2] <= 8.0
    assert spent[2] == pytest.approx(epsilon([(sigma, q, 3 * steps)], ledger["delta"], "prv"),
                                     rel=1e-6)
    assert q == pytest.approx(16 / env.client(0).num_train)
    assert result.metrics["dp/epsilon_rdp"] > spent[2]
    assert 0.0 <= result.metrics["dp/clipped_fraction"] <= 1.0


def test_client_declines_when_its_budget_runs_out(tmp_path, tiny_overrides) -> None:
    # Arrange: a fixed sigma=1 and a budget halfway between one round's and two rounds'
    # epsilon (2 steps per round)
    env = _env(tmp_path, tiny_overrides, "rounds=3", "privacy.noise_multiplier=1.0")
    q, delta = 16 / env.client(0).num_train, 0.1 / env.client(0).num_train
    one, two = (epsilon([(1.0, q, k)], delta, "prv") for k in (2, 4))
    env = _env(tmp_path, tiny_overrides, "rounds=3", "privacy.noise_multiplier=1.0",
               f"privacy.target_epsilon={(one + two) / 2!r}")
    first = train_round(env, 0, server_round=1)
    assert not first.declined and first.metrics["dp/epsilon"] == pytest.approx(one, rel=1e-6)
    # Act
    second = train_round(env, 0, server_round=2, ledger=first.ledger)
    third = train_round(env, 0, server_round=3, ledger=second.ledger)
    # Assert: it stops, says why, spends nothing more, and stays stopped
    assert "privacy budget" in second.declined and second.num_examples == 0
    assert second.ledger["stopped_round"] == 2 and third.declined
    assert third.metrics["dp/epsilon"] == pytest.approx(first.metrics["dp/epsilon"])


@pytest.mark.parametrize("name", zoo_params(MODELS.names()))
def test_every_zoo_model_trains_one_dp_step(tmp_path, tiny_overrides, name) -> None:
    env = _env(tmp_path, tiny_overrides, f"model={name}", "train.local_steps=1",
               "train.batch_size=8")
    before = {k: v.clone() for k, v in env.state().items()}
    result = train_round(env, 0, server_round=1)
    after = env.state()
    # Assert: trainable weights moved, BatchNorm statistics did not (frozen), all finite
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not any("running_" in k for k in moved)
    assert result.metrics["dp/epsilon"] > 0 and result.metrics["train/steps"] == 1


@pytest.mark.parametrize("poisson", [True, False])
def test_private_batches_sizes(poisson) -> None:
    # Arrange: 200 samples, rate 0.1 (expected batch 20), 50 steps
    images = torch.zeros(200, 1, 8, 8, dtype=torch.uint8)
    loader = InMemoryLoader(images, torch.arange(200) % 2, indices=np.arange(200),
                            batch_size=20, transform=None, shuffle=True, seed=0)
    # Act
    sizes = [len(y) for _, y in private_batches(
        loader, rate=0.1, steps=50, generator=torch.Generator().manual_seed(1),
        poisson=poisson)]
    # Assert: 50 logical batches; Poisson sizes vary around 20, shuffled ones are 20
    assert len(sizes) == 50
    if poisson:
        assert 14 < np.mean(sizes) < 26 and len(set(sizes)) > 3
    else:
        assert set(sizes) == {20}


def test_class_weights_come_from_noisy_counts_and_cost_budget(tmp_path, tiny_overrides) -> None:
    # Arrange: balanced class weights under DP-SGD, count noise sigma=10, budget eps=2
    env = _env(tmp_path, tiny_overrides, "train.class_weighting=balanced",
               "privacy.target_epsilon=2", "privacy.count_noise=10")
    labels = env.dataset.train.labels[env.partitions[0].train_indices]
    # Act
    book = client_ledger(env.cfg, 0, labels, env.num_classes)
    # Assert: the count release opens the history, the weights are near the true
    # balanced ones (noise 10 on counts of tens), and the whole plan fits the budget
    assert book.history == [(10.0, 1.0, 1)]
    assert len(book.class_weights) == env.num_classes and min(book.class_weights) > 0
    steps = env.cfg.rounds * steps_per_round(env.cfg, len(labels))
    total = epsilon([*book.history, (book.noise_multiplier, book.sample_rate, steps)],
                    book.delta, "prv")
    assert 1.95 <= total <= 2.0
    result = train_round(env, 0, server_round=1)
    assert tuple(result.ledger["history"][0]) == (10.0, 1.0, 1)


def test_a_handed_back_ledger_is_checked_against_the_clients_own_config(
        tmp_path, tiny_overrides) -> None:
    # Arrange: the ledger client 0 reported after round 1 (balanced weights, eps=2)
    from fedimg.errors import UpdateError
    from fedimg.privacy.dp_sgd import adopted_ledger

    env = _env(tmp_path, tiny_overrides, "train.class_weighting=balanced",
               "privacy.target_epsilon=2")
    reported = train_round(env, 0, server_round=1).ledger
    # Act / Assert: the honest copy is adopted as is ...
    assert adopted_ledger(env, 0, reported) == reported
    # ... a smaller sigma, a bigger budget or a negative class weight are refused
    for key, value in (("noise_multiplier", reported["noise_multiplier"] / 2),
                       ("target_epsilon", 50.0),
                       ("class_weights", [-2.0] + reported["class_weights"][1:])):
        with pytest.raises(UpdateError, match="does not match this client's privacy config"):
            adopted_ledger(env, 0, {**reported, key: value})


def _private_round(*, physical: int, lr: float, class_weights: torch.Tensor | None = None):
    """5 noiseless DP-SGD steps (sigma=0, C=1) of a linear model on 40 4-px images, q=0.2."""
    cfg = compose_config("medical", ["privacy=dp_sgd", "weights=none", "train.optimizer=sgd",
                                     "train.momentum=0", "train.weight_decay=0",
                                     "train.batch_size=8", "train.local_steps=5",
                                     f"privacy.physical_batch_size={physical}"])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=g)
    loader = InMemoryLoader(images, torch.arange(40) % 2, indices=np.arange(40), batch_size=8,
                            transform=None, shuffle=False, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    book = PrivacyLedger(target_epsilon=8.0, delta=1e-3, noise_multiplier=0.0, sample_rate=0.2)
    stats = train_private(model, loader, book, cfg=cfg, device=torch.device("cpu"),
                          class_weights=class_weights, lr=lr, steps=5,
                          generator=torch.Generator().manual_seed(3))
    return model, stats, book, loader


def test_micro_batches_add_up_to_one_step_per_poisson_batch() -> None:
    # Arrange / Act: the same Poisson batches (same generator, no noise drawn), fed whole
    # or in pieces of at most 3 samples
    whole, whole_stats, whole_book, _ = _private_round(physical=1000, lr=0.5)
    split, split_stats, split_book, _ = _private_round(physical=3, lr=0.5)
    # Assert: the same weights and metrics; the accountant counted 5 steps, not the pieces
    for a, b in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert whole_book.history == split_book.history == [(0.0, 0.2, 5)]
    assert whole_stats["train/steps"] == split_stats["train/steps"] == 5.0
    assert whole_stats["train/samples"] == split_stats["train/samples"]
    for key in ("train/loss", "train/first_loss", "train/last_loss", "train/accuracy"):
        assert split_stats[key] == pytest.approx(whole_stats[key], rel=1e-6), key


def test_dp_sgd_metrics_mean_what_the_plain_loop_reports_on_the_same_batches() -> None:
    # Arrange: lr=0 keeps the model fixed; class 1 weighs 3
    from fedimg.config import TrainConfig
    from fedimg.training import train_local

    weights = torch.tensor([1.0, 3.0])
    model, stats, _, loader = _private_round(physical=3, lr=0.0, class_weights=weights)
    batches = list(private_batches(loader, rate=0.2, steps=5,
                                   generator=torch.Generator().manual_seed(3)))
    # Act: the plain loop on those Poisson batches, with the same class weights
    plain = train_local(model, batches, cfg=TrainConfig(local_steps=5), lr=0.0,
                        device=torch.device("cpu"), class_weights=weights)
    # Assert: loss, first/last loss (first/last ceil(0.1 * 5) = 1 step) and accuracy agree
    assert stats["train/samples"] == plain.num_examples == sum(len(y) for _, y in batches)
    for key, value in plain.as_metrics().items():
        if key != "train/seconds":
            assert stats[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize(("train", "expected"), [
    (dict(), 13), (dict(local_epochs=2), 26),  # 1/q = 440 // 32 = 13 Poisson batches
    (dict(local_budget="steps", local_steps=10), 10),
    (dict(local_budget="steps_per_sample", steps_per_sample=0.05), 22)])  # 0.05 * 440
def test_noisy_steps_per_round_follow_the_local_budget(train, expected) -> None:
    import dataclasses

    from fedimg.config import FedimgConfig

    cfg = FedimgConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    assert steps_per_round(cfg, 440) == expected


def test_a_dp_round_takes_and_reports_the_budgets_steps(tmp_path, tiny_overrides) -> None:
    # Arrange: steps_per_sample=0.05 instead of _env's local_steps=2
    env = _env(tmp_path, tiny_overrides, "train.local_steps=null",
               "train.local_budget=steps_per_sample", "train.steps_per_sample=0.05")
    n = env.client(0).num_train
    planned = steps_per_round(env.cfg, n)

    # Act
    result = train_round(env, 0, server_round=1, ledger=None)

    # Assert: ceil(0.05 n) steps planned, accounted and reported
    assert planned == -(-n // 20)
    assert result.metrics["train/steps"] == float(planned)
