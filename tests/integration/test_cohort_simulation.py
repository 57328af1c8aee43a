"""End to end on the Ray engine: 4 clients as one cohort (sim.cohort_size=4) or 4 messages.

A cohort's members are trained together by one worker (vectorised or one by one, as
its measured rule decides); the run must be the run without cohorts, to float
tolerance: the same training and test metrics every round.
"""

from __future__ import annotations

import json

import pytest

from fedimg.simulate import run

pytestmark = pytest.mark.slow

# The cached tail of pretrained EfficientNet-Lite0 (its last block and head) at 64 px:
# 4 clients of about 43 images, batches of 16, so 3 steps each; 2 rounds
ARGV = ["scenario=medical", "rounds=2", "clients=4", "data.source=synthetic",
        "data.image_size=64", "data.synthetic.train_size=192", "data.synthetic.test_size=64",
        "data.min_partition_size=8", "data.partitioner=iid", "data.quantity_skew=0",
        "data.augment=none", "transfer.mode=last_k", "transfer.last_k=1", "train.lr=0.02",
        "train.batch_size=16", "sim.ray_num_cpus=2", "output.progress=false"]
COMPARED = ("train/loss", "train/first_loss", "train/last_loss", "test/loss", "test/accuracy",
            "val/loss", "val/accuracy")


def _rounds(tmp_path, cohort_size: int) -> list[dict]:  # noqa: ANN001
    run_dir = tmp_path / f"cohort_{cohort_size}"
    run([*ARGV, f"sim.cohort_size={cohort_size}", f"hydra.run.dir={run_dir}"])
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_cohort_of_four_runs_as_four_lone_clients(tmp_path) -> None:
    # Act
    lone, cohort = _rounds(tmp_path, 1), _rounds(tmp_path, 4)

    # Assert: every client trained in every round, and the metrics agree
    assert [r["round"] for r in cohort] == [0, 1, 2]
    for a, b in zip(lone[1:], cohort[1:], strict=True):
        assert b["fleet/ok"] == a["fleet/ok"] == 4
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-4), (b["round"], key)
    # the model went down once for 4 training clients instead of 4 times (then once to
    # each of the 4 evaluating clients: 5 models instead of 8); the updates came up alike
    assert cohort[1]["bytes/down"] * 8 == lone[1]["bytes/down"] * 5
    assert cohort[1]["bytes/up"] == lone[1]["bytes/up"]
