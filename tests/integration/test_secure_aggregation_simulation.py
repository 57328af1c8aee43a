"""SecAgg+ in a real Ray simulation: the real ClientApp and its mod, Flower's engine.

The same seeded run twice, plain FedAvg and secure aggregation, with client 2
failing after it shared its keys (``faults.raise_at``): the secure round still ends
with the survivors' exact mean, so both global models agree to the dequantisation
bound, and the record shows each stage's cost.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedimg.privacy.secagg import BUFFER_SCALE
from fedimg.simulate import run

pytestmark = pytest.mark.slow


def _final(run_dir) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)["state_dict"]


def test_secure_round_equals_fedavg_with_a_dropout(tmp_path, tiny_overrides) -> None:
    common = [*tiny_overrides, "clients=4", "rounds=1", "data.synthetic.train_size=160",
              "faults.raise_at=[[1,2]]", "sim.ray_num_cpus=2", "output.plots=false",
              "fl.fraction_evaluate=0"]
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    run([*common, f"hydra.run.dir={plain}"])
    run([*common, "fl.secure_aggregation=secaggplus", f"hydra.run.dir={secure}"])
    a, b = _final(plain), _final(secure)
    record = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()][1]
    assert record["secagg/contributors"] == 3 and record["fleet/failed"] == 1
    # 3 contributors, each off by < 1 step of (n_i / W) w (W / sum(n) <= 1); a BatchNorm
    # statistic's step is BUFFER_SCALE times coarser; plus float32 rounding of the value
    for key in (k for k in a if a[k].is_floating_point()):
        unit = BUFFER_SCALE if key.endswith(("running_mean", "running_var")) else 1.0
        bound = 3 * record["secagg/step"] * unit + 2**-22 * float(a[key].abs().max()) + 1e-7
        assert float((a[key].double() - b[key].double()).abs().max()) <= bound, key
    for stage in ("setup", "share_keys", "collect", "unmask"):
        assert record[f"secagg/{stage}_bytes"] > 0 and record[f"secagg/{stage}_s"] >= 0
