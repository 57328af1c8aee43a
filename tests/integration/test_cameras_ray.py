"""End to end: the cameras scenario on the Ray engine, real GTSRB, unreliable devices.

Every sampled camera's recorded fate is the one :mod:`fedimg.simulation.fleet` drew for it,
through the real Flower simulation: offline and dropped cameras send nothing, the
rest are aggregated, and the round's counters and personalization figures are set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedimg.simulation import fleet
from fedimg.resolve import compose_and_check
from fedimg.simulate import run

pytestmark = pytest.mark.slow


def test_a_small_camera_fleet_records_what_each_device_did(shared_data: Path,
                                                           tmp_path: Path) -> None:
    # Arrange: 12 cameras, half sampled per round, flaky: 60% online, 30% die mid-round.
    run_dir = tmp_path / "run"
    argv = ["scenario=cameras", f"hydra.run.dir={run_dir}", f"data.root={shared_data}",
            "data.source=strict", "rounds=2", "clients=12", "data.image_size=32",
            "train.local_steps=2", "fl.fraction_train=0.5", "fl.fraction_evaluate=0.25",
            "fl.min_replies=1", "fl.on_too_few=skip", "fl.personalize_steps=2",
            "hetero.availability=0.6", "hetero.dropout=0.3", "hetero.deadline_s=1000",
            "sim.ray_num_cpus=2", "output.progress=false", "output.plots=false"]
    cfg = compose_and_check("cameras", argv[1:])
    # Act
    results = run(argv)
    # Assert
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen: set[str] = set()
    for r in rounds[1:]:
        trained = {int(p): c for p, c in r["clients"].items() if "train" in c}
        assert r["fleet/sampled"] == len(trained) == 6
        for pid, entry in trained.items():
            draw = fleet.conditions(cfg, r["round"], pid)
            want = ("offline" if not draw.online else
                    "dropped" if draw.drop_after is not None else "ok")
            got = entry.get("train_status", "ok").split(":")[0]
            assert got == want, (r["round"], pid, entry)
            seen.add(got)
            if want == "ok":  # an aggregated update carries its device time
                assert entry["train"]["fleet/device_s"] > 0
            else:  # an absent device sent no update
                assert entry["bytes/up"] == 0
        assert r["fleet/ok"] + r["fleet/offline"] + r["fleet/dropped"] == 6
        assert 0.0 <= r["val/personal_accuracy"] <= 1.0 and "fair/worst_accuracy" in r
    assert seen == {"ok", "offline", "dropped"}  # seed 0 shows each within 2 rounds
    part = results["participation"]
    assert part["sampled"] == 12
    assert part["ok"] == sum(r["fleet/ok"] for r in rounds[1:])
