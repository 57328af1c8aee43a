"""The run state and the client sampler: one owner, one seeded generator per round."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from offline_grid import fedavg

from fedimg.serverapp.state import RunState, Sampler, global_rng_state, restore_global_rng

NODES = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]


@pytest.mark.parametrize(("seed", "server_round", "size"), [(0, 1, 3), (7, 2, 5), (42, 9, 10)])
def test_a_round_samples_what_reseeding_global_random_used_to(seed: int, server_round: int,
                                                               size: int) -> None:
    # Arrange: the old server seeded global random per round; Flower then sampled from it.
    random.seed(f"{seed}-{server_round}")
    old = random.sample(NODES, size)
    # Act
    rng = Sampler(seed).for_round(server_round)
    new = Sampler.sample(rng, NODES, fraction=size / len(NODES), minimum=1)
    # Assert: the same clients, in the same order
    assert new == old


def test_retries_and_evaluation_draw_on_from_the_rounds_generator() -> None:
    # Within round 3: a training sample, its retry, then the evaluation sample.
    rng = Sampler(5).for_round(3)
    draws = [Sampler.sample(rng, NODES, fraction=0.2, minimum=1) for _ in range(3)]
    reference = random.Random("5-3")
    assert draws == [reference.sample(NODES, 2) for _ in range(3)]
    # Round 4 starts afresh, whatever round 3 drew: a resumed run samples the same.
    assert Sampler(5).for_round(4).random() == random.Random("5-4").random()


def test_the_sample_size_is_flowers_fraction_with_a_minimum() -> None:
    # max(int(n x fraction), minimum), at most n: int(10 x 0.25) = 2
    rng = random.Random(0)
    assert len(Sampler.sample(rng, NODES, fraction=0.25, minimum=1)) == 2
    assert len(Sampler.sample(rng, NODES, fraction=0.25, minimum=3)) == 3
    assert len(Sampler.sample(rng, NODES, fraction=0.25, minimum=12)) == 10
    assert Sampler.sample(rng, [], fraction=1.0, minimum=2) == []


def test_sampling_leaves_global_random_alone() -> None:
    random.seed(1)
    expected = random.random()
    random.seed(1)
    Sampler.sample(Sampler(3).for_round(1), NODES, fraction=0.5, minimum=1)
    assert random.random() == expected


def test_a_secret_sampler_draws_from_the_os_not_the_seed() -> None:
    # Under client-level DP the sample is part of the mechanism: it must not be guessable.
    rng = Sampler(0, secret=True).for_round(1)
    assert isinstance(rng, random.SystemRandom)
    assert not isinstance(Sampler(0).for_round(1), random.SystemRandom)


def test_the_run_state_counts_rejections_skips_and_ledgers() -> None:
    state = RunState(arrays=ArrayRecord(), strategy=fedavg(), sampler=Sampler(0))
    # Rejections add up per client
    assert [state.count_rejection(2), state.count_rejection(2), state.count_rejection(0)] == [
        1, 2, 1]
    assert dict(state.rejections) == {2: 2, 0: 1}
    # Skips count the rounds skipped in a row: 1, 2, then a round that was not: 0
    assert [state.count_skip(True), state.count_skip(True), state.count_skip(False)] == [1, 2, 0]
    # A reported ledger is kept, and its client no longer needs the restored one
    state.ledgers_to_return = {0, 1}
    state.report_ledger(1, '{"history": []}')
    assert state.ledgers == {1: '{"history": []}'} and state.ledgers_to_return == {0}


def test_global_rng_state_round_trips_numpy_and_torch() -> None:
    # Arrange
    saved = global_rng_state()
    expected = (np.random.rand(), float(torch.rand(1)))
    # Act
    np.random.rand(), torch.rand(1)  # draws that move both on
    restore_global_rng(saved)
    # Assert
    assert (np.random.rand(), float(torch.rand(1))) == expected


def test_no_saved_state_draws_fresh_secret_noise() -> None:
    np.random.seed(0)
    seeded = np.random.rand()
    restore_global_rng({})
    first = np.random.rand()
    restore_global_rng({})
    assert first != np.random.rand() and first != seeded  # 128 fresh bits each time
