"""SecAgg+ arithmetic: the plan's numbers by hand, masks that cancel, overflow detection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedimg.errors import ConfigError
from fedimg.privacy.distributed_dp import ddg_tau, discrete_gaussian, honest_clients
from fedimg.privacy.secagg import (
    HEADER,
    SecAggError,
    decode,
    encode,
    make_plan,
    mask,
    masked,
    neighbourhood,
    stochastic_round,
)
from fedimg.privacy.secure_noise import ChaChaStream


def _plan(**kw: object):  # type: ignore[no-untyped-def]
    args = dict(sampled=5, shares=None, threshold=0.6, modulus_bits=32, clip=1.0, dim=6,
                max_weight=1000)
    args.update(kw)
    return make_plan(**args)  # type: ignore[arg-type]


def test_plan_without_noise_fills_a_quarter_of_the_modulus() -> None:
    plan = _plan()
    # K = floor((2^30 - 5) / 5) - 1; bound = 5 (K + 1) <= 2^30
    assert plan.scale == 214_748_362 and plan.bound == 1_073_741_815 <= 2**30
    assert (plan.shares, plan.threshold) == (5, 3)  # max(5 // 2 + 1, ceil(0.6 * 5))
    assert plan.step == pytest.approx(1.0 / 214_748_362)


def test_neighbourhoods_are_odd_and_capped_at_21() -> None:
    assert [neighbourhood(m, None) for m in (3, 5, 20, 21, 40, 200)] == [3, 5, 20, 21, 21, 21]
    assert neighbourhood(40, 10) == 9


def test_distributed_dp_raises_the_threshold_to_the_honest_fraction() -> None:
    plan = _plan(noise_multiplier=1.0, tolerance=0.2, dim=10_000, max_weight=1)
    assert plan.threshold == 4  # ceil(0.8 * 5) > ceil(0.6 * 5)
    assert honest_clients(5, 0.2) == 4
    # each client's std: sigma (K + sqrt(d)) / sqrt(4); the summed noise fits the bound
    assert plan.noise_std == pytest.approx((plan.scale + 100) / 2)
    assert plan.bound <= 2**30 and 5 * (plan.scale + 1) + 10 * plan.noise_std * math.sqrt(5) \
        == pytest.approx(plan.bound, abs=1)


def test_too_small_a_modulus_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="secagg.modulus_bits=16 is too small"):
        _plan(modulus_bits=16)
    with pytest.raises(ConfigError, match="raise secagg.modulus_bits"):
        _plan(modulus_bits=24, max_weight=1, noise_multiplier=1.0, tolerance=0.2, dim=10**8)


def test_pairwise_masks_cancel_and_self_masks_remain() -> None:
    plan = _plan(sampled=3, dim=4)
    seeds = {(1, 2): b"a" * 32, (1, 3): b"b" * 32, (2, 3): b"c" * 32}
    own = {1: b"x" * 32, 2: b"y" * 32, 3: b"z" * 32}
    values = {1: np.array([1, -2, 3, 0]), 2: np.array([5, 5, -5, 7]), 3: np.array([0, 0, 0, -1])}
    total = np.zeros(HEADER + 4, dtype=np.uint64)
    for me in (1, 2, 3):
        pairs = {o: seeds[tuple(sorted((me, o)))] for o in (1, 2, 3) if o != me}
        enc = encode(values[me], weight=10 * me, clipped=0, plan=plan)
        total += masked(enc, own_seed=own[me], pair_seeds=pairs, me=me, plan=plan)
    for me in (1, 2, 3):
        total -= mask(own[me], plan)
    weight, clipped, body = decode(total & np.uint64(plan.modulus - 1), plan, contributors=3)
    assert (weight, clipped) == (60, 0)
    assert np.allclose(body, np.array([6, 3, -2, 6]) * plan.step)


def test_a_wrapped_sum_is_detected_not_released() -> None:
    plan = _plan(sampled=3, dim=2)
    enc = encode(np.array([plan.bound + 1, 0]), weight=1, clipped=0, plan=plan)
    with pytest.raises(SecAggError, match="overflow"):
        decode(enc, plan, contributors=1)
    with pytest.raises(SecAggError, match="corrupt"):
        decode(encode(np.array([0, 0]), weight=1, clipped=0, plan=plan), plan, contributors=2)


def test_stochastic_rounding_is_unbiased() -> None:
    rounded = stochastic_round(np.full(200_000, 2.3), ChaChaStream(b"k" * 32))
    assert set(np.unique(rounded)) == {2, 3}
    assert rounded.mean() == pytest.approx(2.3, abs=0.005)


def test_discrete_gaussian_matches_its_pmf() -> None:
    for std in (0.5, 3.0):
        draws = discrete_gaussian(std, 200_000, ChaChaStream(b"g" * 32))
        support = np.arange(-60, 61)
        pmf = np.exp(-support**2 / (2 * std**2))
        pmf /= pmf.sum()
        assert draws.dtype == np.int64 and abs(draws.mean()) < 0.02
        assert draws.var() == pytest.approx(float((pmf * support**2).sum()), rel=0.02)


def test_tau_by_hand() -> None:
    assert ddg_tau(1.0, 2) == pytest.approx(10 * math.exp(-math.pi**2))  # k = 1 only
    assert ddg_tau(50.0, 40) == 0.0  # s >> 1: the sum is a discrete Gaussian
