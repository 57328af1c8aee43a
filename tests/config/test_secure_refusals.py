"""What secure aggregation cannot check is refused at config time, one line each."""

from __future__ import annotations

import pytest

from fedimg.errors import ConfigError
from fedimg.resolve import compose_and_check

SECURE = "fl.secure_aggregation=secaggplus"


@pytest.mark.parametrize(("overrides", "message"), [
    ([SECURE, "strategy=krum"], "strategy=krum with fl.secure_aggregation: it needs each update"),
    ([SECURE, "strategy=fedmedian"], "Valid strategies: fedadam, fedavg, fedavgm, fedprox, fedyogi"),
    ([SECURE, "privacy=client_dp"], "Fix: privacy=distributed_dp"),
    ([SECURE, "fl.max_update_norm=5"], "cannot measure one update's norm"),
    ([SECURE, "compression.kind=int8"], "masks sum only dense vectors"),
    ([SECURE, "clients=2", "fl.min_train_clients=2"], "each learns the other's update"),
    (["privacy=distributed_dp", "fl.secure_aggregation=none"],
     "Fix: fl.secure_aggregation=secaggplus"),
    ([SECURE, "secagg.threshold=0.5"], "secagg.threshold=0.5 must be in (0.5, 1]"),
    ([SECURE, "secagg.modulus_bits=64"], "secagg.modulus_bits=64 must be in 16..62"),
    (["privacy=distributed_dp", "privacy.dropout_tolerance=1"],
     "privacy.dropout_tolerance=1.0 must be in [0, 1)"),
])
def test_refused_with_its_reason(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_and_check("medical", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_what_secure_aggregation_allows_composes() -> None:
    for overrides in ([SECURE, "strategy=fedadam"], [SECURE, "privacy=dp_sgd"],
                      ["privacy=distributed_dp"]):
        cfg = compose_and_check("medical", overrides)
        assert cfg.fl.secure_aggregation == "secaggplus"
