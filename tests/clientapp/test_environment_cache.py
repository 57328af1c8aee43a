"""The TaskEnvironment's frozen-trunk feature cache: same results, DP-SGD, re-keying, bounds."""

from __future__ import annotations

import logging
from collections import namedtuple

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedimg.build import initial_model
from fedimg.clientapp.environment import TaskEnvironment
from fedimg.config.compose import compose_config
from fedimg.models import build_model
from fedimg.privacy.dp_sgd import train_round
from fedimg.training import feature_cache as fc
from fedimg.training.feature_cache import TrunkCache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LOG = "fedimg.training.feature_cache"


def _env(tmp_path, tiny_overrides, *extra: str, cache: str = "on",
         weights: str = "none") -> TaskEnvironment:
    """Two clients of 16 px synthetic images, resnet18 (random init) partly frozen.

    ``weights=pretrained`` loads the run's first global model (ImageNet weights), as the
    server's first message would: EfficientNet-Lite0's features at random init are ~1e-9.
    """
    cfg = compose_config("medical", [*tiny_overrides, f"hydra.run.dir={tmp_path}",
                                     "data.image_size=16", "data.augment=none", "rounds=3",
                                     f"weights={weights}", "model=resnet18",
                                     "transfer.mode=head", "transfer.bn=frozen",
                                     "train.batch_size=16", "train.local_steps=4",
                                     f"train.feature_cache={cache}", *extra])
    env = TaskEnvironment(cfg, num_threads=2)
    if weights == "pretrained":
        env.load_state(initial_model(cfg, env.num_classes)[0])
    return env


def _round_trip(env: TaskEnvironment) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """Two rounds of client 0 from the same start, then its validation metrics."""
    start = env.state()
    first, _ = env.train(0, server_round=1)
    env.load_state(start)
    second, _ = env.train(0, server_round=2)
    val, _ = env.evaluate_client(0)
    return {**first, "second": second["train/loss"]}, val, env.state()


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["head", "last_k"])
def test_a_cached_round_equals_the_uncached_one(tmp_path, tiny_overrides, mode) -> None:
    # Arrange
    off = _env(tmp_path, tiny_overrides, f"transfer.mode={mode}", cache="off")
    on = _env(tmp_path, tiny_overrides, f"transfer.mode={mode}", cache="on")
    # Act
    metrics_off, val_off, state_off = _round_trip(off)
    metrics_on, val_on, state_on = _round_trip(on)
    # Assert: the cache was used (one train and one val slot), and nothing moved
    assert (on.trunk_cache.plan.train, on.trunk_cache.builds, off.trunk_cache.builds) == \
        (True, 2, 0)
    assert metrics_on["train/steps"] == metrics_off["train/steps"] == 4
    for key in ("train/loss", "train/accuracy", "second"):
        assert metrics_on[key] == pytest.approx(metrics_off[key], rel=1e-5), key
    assert val_on == pytest.approx(val_off, rel=1e-5)
    _assert_same(state_on, state_off)


def test_auto_trains_lite0_from_the_cache_exactly_as_without_it(
        tmp_path, tiny_overrides) -> None:
    # Arrange: EfficientNet-Lite0's frozen blocks run without stochastic depth
    # (fedimg.models.transfer), so its trunk is a function of the image; the trained
    # last block keeps its drop-connect, in the tail, with the same random draws.
    args = ("model=efficientnet_lite0", "transfer.mode=last_k", "data.image_size=32")
    cached = _env(tmp_path, tiny_overrides, *args, cache="auto", weights="pretrained")
    reference = _env(tmp_path, tiny_overrides, *args, cache="off", weights="pretrained")
    # Act
    metrics_on, val_on, state_on = _round_trip(cached)
    metrics_off, val_off, state_off = _round_trip(reference)
    # Assert
    assert cached.trunk_cache.split.exact and cached.trunk_cache.plan.train
    assert metrics_on["train/loss"] == pytest.approx(metrics_off["train/loss"], rel=1e-5)
    assert val_on == pytest.approx(val_off, rel=1e-5)
    _assert_same(state_on, state_off)


@pytest.mark.parametrize("model, mode", [("resnet18", "head"),
                                         ("efficientnet_lite0", "last_k")])
def test_dp_sgd_on_the_cached_tail_equals_dp_sgd_on_the_whole_model(tmp_path, tiny_overrides,
                                                                    model, mode) -> None:
    # Arrange: seeded noise and Poisson batches, so both runs draw the same; Lite0 with
    # its ImageNet weights
    extra = ("privacy=dp_sgd", "privacy.seeded_noise=true", "privacy.noise_multiplier=1.0",
             "train.class_weighting=none",
             "train.local_steps=3", f"model={model}", f"transfer.mode={mode}",
             "data.image_size=32")
    weights = "pretrained" if model == "efficientnet_lite0" else "none"
    off, on = (_env(tmp_path, tiny_overrides, *extra, cache=c, weights=weights)
               for c in ("off", "on"))
    # Act: two DP-SGD rounds, the ledger carried over
    results = {}
    for name, env in (("off", off), ("on", on)):
        first = train_round(env, 0, server_round=1)
        second = train_round(env, 0, server_round=2, ledger=first.ledger)
        results[name] = (first, second, env.state())
    # Assert: the same losses, clipping, sigma, epsilon and weights; Opacus wrapped the tail
    (f_off, s_off, state_off), (f_on, s_on, state_on) = results["off"], results["on"]
    for key in ("train/loss", "dp/clipped_fraction", "dp/sigma", "dp/epsilon"):
        assert s_on.metrics[key] == pytest.approx(s_off.metrics[key], rel=1e-5), key
    assert f_on.metrics["train/steps"] == 3 and s_on.ledger == s_off.ledger
    assert on.trunk_cache.builds == 1 and isinstance(on.private_inputs(0)[0],
                                                     torch.fx.GraphModule)
    _assert_same(state_on, state_off)


def test_fedavg_rounding_moves_frozen_weights_and_the_cache_rebuilds(tmp_path, tiny_overrides,
                                                                    caplog) -> None:
    # Arrange: two honest replies return the frozen weights exactly as sent
    env = _env(tmp_path, tiny_overrides)
    sent = env.state()
    frozen = sorted(env.frozen_keys)
    env.train(0, server_round=1)
    replies = [RecordDict({"arrays": ArrayRecord({k: Array(sent[k].numpy()) for k in frozen}),
                           "metrics": MetricRecord({"num-examples": n})}) for n in (3, 4)]
    # Act: Flower's weighted mean (FedAvg's) of identical float32 arrays: 3/7 x + 4/7 x
    mean = aggregate_arrayrecords(replies, "num-examples")
    moved = sum(int((torch.from_numpy(mean[k].numpy()) != sent[k]).sum()) for k in frozen)
    env.load_state({**sent, **{k: torch.from_numpy(mean[k].numpy()) for k in frozen}})
    caplog.set_level(logging.INFO, logger=LOG)
    env.train(0, server_round=2)
    # Assert: the mean is not x to the bit, so the next round rebuilds (never serves a
    # stale entry); the exact weights again would be served from the cache
    assert moved > 0
    assert env.trunk_cache.builds == 2 and "frozen trunk weights changed" in caplog.text
    env.load_state({**sent, **{k: torch.from_numpy(mean[k].numpy()) for k in frozen}})
    env.train(0, server_round=3)
    assert env.trunk_cache.builds == 2


def test_without_memory_or_disk_the_round_runs_uncached_and_says_so(tmp_path, tiny_overrides,
                                                                   caplog, monkeypatch) -> None:
    # Arrange: a budget of 1 KiB and a disk with 1 KiB free
    env = _env(tmp_path, tiny_overrides, f"train.feature_cache_gb={2 ** -20}")
    reference = _env(tmp_path, tiny_overrides, cache="off")
    monkeypatch.setattr(fc.shutil, "disk_usage", lambda _: namedtuple("U", "free")(1024))
    caplog.set_level(logging.INFO, logger=LOG)
    # Act
    metrics, _, state = _round_trip(env)
    expected, _, reference_state = _round_trip(reference)
    # Assert
    assert "client 0 train features needs" in caplog.text
    assert "training it uncached" in caplog.text
    assert env.trunk_cache.builds == 0 and metrics["train/loss"] == expected["train/loss"]
    _assert_same(state, reference_state)


@pytest.mark.parametrize("scenario, size, train, evaluate, reason", [
    ("medical", 64, False, False, "transfer.mode=full trains every layer: nothing to cache"),
    ("medical_dp", 32, True, True, "training from a bank of 4 augmented views per image"),
    ("cameras", 48, True, True, "training from a bank of 4 augmented views per image"),
])
def test_what_the_scenarios_cache_under_auto(tmp_path, scenario, size, train,
                                             evaluate, reason) -> None:
    # Arrange: each scenario as shipped (augment=light; medical fine-tunes everything)
    cfg = compose_config(scenario, [f"hydra.run.dir={tmp_path}"])
    assert (cfg.train.feature_cache, cfg.data.image_size) == ("auto", size)
    model = build_model(cfg.model, num_classes=2, weights="none", transfer=cfg.transfer)
    # Act
    plan = TrunkCache.build(model, cfg=cfg, device=torch.device("cpu")).plan
    # Assert: head and last_k scenarios train from a view bank (their accuracy over 3
    # seeds: BENCHMARKS.md 15); full fine-tuning has no trunk
    assert (plan.train, plan.evaluate) == (train, evaluate) and plan.reason.startswith(reason)


@pytest.mark.parametrize("mode, bn", [("last_k", "train"), ("head", "frozen")])
def test_cached_evaluation_gives_the_same_numbers_to_the_bit(tmp_path, tiny_overrides, mode,
                                                             bn) -> None:
    # evaluation never augments: its cache is exact, batch by batch as without it
    args = ("model=efficientnet_lite0", f"transfer.mode={mode}", f"transfer.bn={bn}",
            "data.image_size=32", "data.augment=light", "train.eval_batch_size=4")
    on, off = (_env(tmp_path, tiny_overrides, *args, cache=c, weights="pretrained")
               for c in ("auto", "off"))
    assert (on.trunk_cache.plan.train, on.trunk_cache.plan.evaluate) == (True, True)
    assert on.evaluate_client(0) == off.evaluate_client(0)
    assert on.evaluate_client(1) == off.evaluate_client(1)
    assert on.trunk_cache.builds == 2 and np.isfinite(on.evaluate_client(0)[0]["val/loss"])
