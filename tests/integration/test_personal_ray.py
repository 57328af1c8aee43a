"""End to end on the Ray engine: each personal mode (fl.personal) for 2 rounds, tiny data.

Each client reports its personalised model (``val/personal_*``) beside the global one
(``val/*``), and the server summarises the worst client (``fair/worst_personal_*``).
"""

from __future__ import annotations

import json

import pytest
import torch

from fedimg.build import initial_model
from fedimg.config import from_dict
from fedimg.simulate import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("personal", ["fedper", "fedrep", "ditto"])
def test_a_personal_mode_reports_each_clients_own_model(tmp_path, tiny_overrides,
                                                        personal: str) -> None:
    # Arrange
    run_dir = tmp_path / "run"
    argv = [*tiny_overrides, "scenario=medical", f"hydra.run.dir={run_dir}", "rounds=2",
            "train.local_steps=2", "train.batch_size=16", "sim.ray_num_cpus=2",
            f"fl.personal={personal}", "fl.fedrep_head_steps=2"]
    # Act
    run(argv)
    # Assert: every update passed the server's strict checks (the head came back as
    # sent) and every round reports both models per client, and the worst client
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rounds[1:]:
        assert r["fleet/ok"] == 2 and r["fleet/rejected"] == 0 and r["fleet/failed"] == 0
        assert 0 <= r["val/personal_accuracy"] <= 1 and 0 <= r["val/accuracy"] <= 1
        assert r["fair/worst_personal_accuracy"] <= r["val/personal_accuracy"]
        for client in r["clients"].values():
            assert "val/personal_accuracy" in client["val"]
    # FedPer / FedRep: the global head is the initial one, to the bit (no client's head
    # reached the server), while the body moved
    if personal != "ditto":
        cfg = from_dict(json.loads((run_dir / "config.json").read_text())["config"])
        final = torch.load(run_dir / "checkpoints" / "final.pt",
                           weights_only=True)["state_dict"]
        initial = initial_model(cfg, final["_fc.weight"].shape[0])[0]  # seeded: the same
        assert torch.equal(final["_fc.weight"], initial["_fc.weight"])
        assert torch.equal(final["_fc.bias"], initial["_fc.bias"])
        assert not torch.equal(final["_conv_stem.weight"], initial["_conv_stem.weight"])
