"""End to end on the Ray engine: frozen arrays stay home, and nothing else changes.

The same run with ``fl.elide_frozen=false`` (every array travels) and with the default
must give the same metrics, to the bit, every round: the clients fill in the frozen
trunk from their own pretrained model, and the server from the model it sent. Only the
bytes each way fall.
"""

from __future__ import annotations

import json

import pytest

from fedimg.simulate import run

pytestmark = pytest.mark.slow

# The cached tail of pretrained EfficientNet-Lite0 (its last block and head) at 64 px,
# 3 clients, 2 rounds
ARGV = ["scenario=medical", "rounds=2", "clients=3", "data.source=synthetic",
        "data.image_size=64", "data.synthetic.train_size=96", "data.synthetic.test_size=32",
        "data.min_partition_size=8", "data.partitioner=iid", "data.quantity_skew=0",
        "data.augment=none", "transfer.mode=last_k", "transfer.last_k=1", "train.lr=0.02",
        "train.batch_size=16", "sim.ray_num_cpus=2", "output.progress=false"]
SAME = ("train/loss", "test/loss", "test/accuracy", "val/loss", "val/accuracy", "fleet/ok")


def _rounds(tmp_path, elide: bool) -> list[dict]:  # noqa: ANN001
    run_dir = tmp_path / f"elide_{elide}"
    run([*ARGV, f"fl.elide_frozen={str(elide).lower()}", f"hydra.run.dir={run_dir}"])
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_leaving_the_frozen_trunk_home_changes_bytes_only(tmp_path) -> None:
    # Act
    full, lean = _rounds(tmp_path, False), _rounds(tmp_path, True)

    # Assert: the same run, to the bit
    assert [r["round"] for r in lean] == [0, 1, 2]
    for a, b in zip(full, lean, strict=True):
        for key in SAME:
            assert b.get(key) == a.get(key), (b["round"], key)
    # Lite0 is 13.4 MB; its last block and head about 1.7 MB of it
    for a, b in zip(full[1:], lean[1:], strict=True):
        assert b["bytes/down"] < 0.15 * a["bytes/down"]
        assert b["bytes/up"] < 0.15 * a["bytes/up"]
