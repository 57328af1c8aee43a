"""fedimg.simulation.fleet: the seeded draws of device heterogeneity and the device clock."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedimg.simulation import fleet
from fedimg.config import FedimgConfig, HeterogeneityConfig


def _cfg(**hetero) -> FedimgConfig:
    return FedimgConfig(seed=3, clients=500, hetero=HeterogeneityConfig(**hetero))


def test_availability_and_dropout_rates_match_their_probabilities() -> None:
    cfg = _cfg(availability=0.7, dropout=0.2)
    draws = [fleet.conditions(cfg, r, pid) for r in range(1, 5) for pid in range(500)]
    online = np.mean([c.online for c in draws])
    dropped = np.mean([c.drop_after is not None for c in draws])
    # 2000 Bernoulli draws: standard error sqrt(p(1-p)/n) ~ 0.01
    assert online == pytest.approx(0.7, abs=0.03)
    assert dropped == pytest.approx(0.2, abs=0.03)
    fractions = [c.drop_after for c in draws if c.drop_after is not None]
    assert 0 <= min(fractions) and max(fractions) < 1


def test_draws_repeat_for_a_client_and_round_and_differ_between_rounds() -> None:
    cfg = _cfg(availability=0.5, dropout=0.5, speed_sigma=1.0)
    assert fleet.conditions(cfg, 4, 17) == fleet.conditions(cfg, 4, 17)
    rounds = {fleet.conditions(cfg, r, 17).online for r in range(1, 30)}
    assert rounds == {True, False}
    # The speed factor is the client's own: the same in every round.
    assert len({fleet.conditions(cfg, r, 17).speed for r in range(1, 30)}) == 1


def test_speed_factors_are_lognormal_with_median_one() -> None:
    factors = np.array([fleet.speed_factor(_cfg(speed_sigma=0.5), pid) for pid in range(500)])
    logs = np.log(factors)
    assert np.median(factors) == pytest.approx(1.0, abs=0.1)
    assert logs.std() == pytest.approx(0.5, abs=0.05)
    explicit = FedimgConfig(clients=2, hetero=HeterogeneityConfig(speed_factors=[1.0, 4.0]))
    assert fleet.speed_factor(explicit, 1) == 4.0
    assert fleet.speed_factor(_cfg(), 7) == 1.0  # homogeneous by default


def test_device_time_adds_compute_at_its_speed_and_both_links() -> None:
    h = HeterogeneityConfig(downlink_mbps=50, uplink_mbps=20, deadline_s=9)
    cond = fleet.ClientConditions(online=True, drop_after=None, speed=2.5)
    sizes = {"bytes_down": 12_500_000, "bytes_up": 5_000_000}
    # 12.5 MB down at 50 Mbit/s = 2 s; 5 MB up at 20 Mbit/s = 2 s; 1.2 s compute x 2.5 = 3 s
    seconds = fleet.device_seconds(h, cond, compute_s=1.2, steps=10, **sizes)
    assert seconds == pytest.approx(7.0)
    # With a per-step cost the measured compute no longer matters: 10 x 0.2 s x 2.5 = 5 s
    fixed = HeterogeneityConfig(downlink_mbps=50, uplink_mbps=20, step_s=0.2)
    assert fleet.device_seconds(fixed, cond, compute_s=99.0, steps=10, **sizes) \
        == pytest.approx(9.0)
    assert not fleet.late(h, 7.0) and fleet.late(h, 9.01)
    assert fleet.real_delay(h, device_s=7.0, compute_s=1.2) == 0.0  # simulated: no sleep
    real = HeterogeneityConfig(clock="real", deadline_s=9)
    assert fleet.real_delay(real, device_s=3.0, compute_s=1.2) == pytest.approx(1.8)
    assert fleet.real_delay(real, device_s=0.6, compute_s=1.2) == 0.0  # not faster than host
    # A hopeless device sleeps only until just past the deadline (9 - 1.2 + 1 s margin).
    assert fleet.real_delay(real, device_s=1e6, compute_s=1.2) == pytest.approx(8.8)
    assert not fleet.late(real, 100.0)  # a real deadline is the server's timeout instead


def test_a_retried_round_draws_the_devices_afresh() -> None:
    cfg = _cfg(availability=0.5, speed_sigma=1.0)
    first = [fleet.conditions(cfg, 3, pid).online for pid in range(200)]
    retry = [fleet.conditions(cfg, 3, pid, attempt=2) for pid in range(200)]
    assert first != [c.online for c in retry]
    assert [c.speed for c in retry] == [fleet.speed_factor(cfg, pid) for pid in range(200)]


def test_a_dropping_client_completes_a_fraction_of_its_steps() -> None:
    assert fleet.steps_before_drop(10, 0.0) == 0
    assert fleet.steps_before_drop(10, 0.55) == 5
    assert fleet.steps_before_drop(10, 0.999) == 9  # never the whole round


def test_absences_are_tagged_so_the_server_can_tell_them_from_faults() -> None:
    text = str(fleet.ClientOffline("client 3 is offline in round 2"))
    wrapped = f"Exception ClientAppException occurred. Message: {text}"
    assert fleet.absence_status(wrapped) == "offline"
    assert fleet.absence_status(str(fleet.ClientDropped("client 1 dropped"))) == "dropped"
    assert fleet.absence_status("RuntimeError: CUDA out of memory") is None
    assert not fleet.enabled(HeterogeneityConfig())
    assert fleet.enabled(HeterogeneityConfig(uplink_mbps=1.0))
    assert math.isclose(fleet.link_seconds(HeterogeneityConfig(), bytes_down=10**9,
                                           bytes_up=10**9), 0.0)
