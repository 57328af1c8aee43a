"""Central evaluation: pooled test metrics, and per-site metrics from the same pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.config.compose import compose_config
from fedimg.data import Dataset, ImageSet, InMemoryLoader, Provenance, build_transform
from fedimg.serverapp.evaluation import CentralEvaluator, site_key, site_rows
from fedimg.training import evaluate


def _dataset(sites: list[str]) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    n = len(sites)
    test = ImageSet(images=torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8,
                                         generator=gen),
                    labels=torch.tensor([i % 2 for i in range(n)]),
                    metadata={"site": np.array(sites)})
    return Dataset(name="t", classes=("a", "b"), channels=3, train=test, test=test, val=None,
                   provenance=Provenance(source="synthetic", location="memory"))


def _by_hand(evaluator: CentralEvaluator, test: ImageSet, rows: np.ndarray) -> dict:
    loader = InMemoryLoader(test.images, test.labels, indices=rows, batch_size=4,
                            shuffle=False, seed=0,
                            transform=build_transform("none", image_size=16, train=False))
    return evaluate(evaluator.model, loader, device=torch.device("cpu"), num_classes=2)


def test_per_site_metrics_equal_evaluating_that_sites_rows_by_hand() -> None:
    # Arrange: 12 test images from 3 sites, interleaved; one name needs escaping
    sites = ["north", "south", "east wing"] * 4
    ds = _dataset(sites)
    cfg = compose_config("medical", ["model=mobilenet_v3_small", "weights=none",
                                     "data.image_size=16", "train.eval_batch_size=5"])
    evaluator = CentralEvaluator(cfg, ds)
    state = {k: v.clone() for k, v in evaluator.model.state_dict().items()}
    # Act
    metrics = evaluator(state)
    # Assert: each site's block equals a separate evaluation of its 4 rows
    assert sorted({k.split("/")[2] for k in metrics if k.startswith("test/site/")}) == [
        "east_wing", "north", "south"]
    for raw, key in (("north", "north"), ("south", "south"), ("east wing", "east_wing")):
        hand = _by_hand(evaluator, ds.test, np.flatnonzero(np.array(sites) == raw))
        for name in ("accuracy", "balanced_accuracy", "loss"):
            assert metrics[f"test/site/{key}/{name}"] == pytest.approx(hand[name], abs=1e-6)
    pooled = _by_hand(evaluator, ds.test, np.arange(12))
    assert metrics["test/accuracy"] == pytest.approx(pooled["accuracy"])


def test_no_site_column_or_too_many_values_means_pooled_only() -> None:
    ds = _dataset([f"patient{i}" for i in range(70)])
    assert site_rows(ds.test, "site") == {}  # 70 > 64 values: an id, not a site
    assert site_rows(ds.test, "hospital") == {} and site_rows(ds.test, None) == {}
    assert site_key("Ward 3/B") == "Ward_3_B"


def test_central_evaluation_of_a_frozen_trunk_reads_cached_features_with_the_same_numbers(
        ) -> None:
    # Arrange: last_k on ResNet-18 (random init), 12 test images; cache auto against off
    ds = _dataset(["north", "south"] * 6)
    common = ["model=resnet18", "weights=none", "data.image_size=16", "transfer.mode=last_k",
              "transfer.last_k=1", "train.eval_batch_size=5", "data.augment=none"]
    cached = CentralEvaluator(compose_config("medical", [*common, "train.feature_cache=auto"]),
                              ds)
    plain = CentralEvaluator(compose_config("medical", [*common, "train.feature_cache=off"]),
                             ds)
    state = {k: v.clone() for k, v in plain.model.state_dict().items()}
    moved = dict(state, **{"fc.bias": state["fc.bias"] + torch.tensor([0.5, 0.0])})
    # Act: two rounds; only the trained head moves in between
    first, second = cached(state), cached(moved)
    # Assert: the same numbers as the full forward pass, one trunk pass for both rounds
    assert first == plain(state) and second == plain(moved)
    assert first["test/loss"] != second["test/loss"]
    assert cached.cache.builds == 1 and plain.cache.builds == 0
