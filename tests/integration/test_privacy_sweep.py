"""`python -m fedimg.audit` end to end on tiny synthetic data (2 grid points)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from fedimg.audit.__main__ import main

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_sweep_runs_audits_tabulates_and_resumes(tmp_path, tiny_overrides) -> None:
    # Arrange: epsilon 2 and no DP, one seed, LiRA with 2 shadows on both, inversion
    root = tmp_path / "sweep"
    argv = ["scenario=medical", *tiny_overrides, "rounds=2", "transfer.mode=head",
            "train.batch_size=16", "data.synthetic.train_size=128", "sim.ray_num_cpus=2",
            "sweep.epsilons=[2,inf]", "sweep.seeds=[0]", f"sweep.dir={root}",
            "sweep.audit_pool=24", "sweep.lira_shadows=2", "sweep.lira_epsilons=[inf,2]",
            "sweep.inversion_steps=3"]
    # Act
    assert main(argv) == 0
    # Assert: one run dir per point, each audited; the tables and plots exist
    rows = list(csv.DictReader((root / "sweep.csv").open()))
    assert [float(r["target_epsilon"]) for r in rows] == [2.0, math.inf]
    private, plain = rows
    assert 0 < float(private["epsilon"]) <= 2.0 and math.isinf(float(plain["epsilon"]))
    assert float(plain["bound_tpr@1%"]) == 1.0 and float(private["bound_tpr@1%"]) < 0.1
    for row in rows:
        run_dir = root / row["run_dir"].split("/")[-1]
        audit = json.loads((run_dir / "audit.json").read_text())
        held_out = sum(json.loads((run_dir / "partitions.json").read_text())["val_sizes"])
        # non-members are the clients' validation images, so the pool is capped by them
        assert audit["members"] == audit["non_members"] == min(24, held_out) >= 8
        assert 0 <= audit["loss"]["auc"] <= 1 and audit["lira"]["shadows"] == 2
    for name in ("sweep.md", "sweep_summary.csv", "plots/accuracy_vs_epsilon.png",
                 "plots/mia_vs_epsilon.png", "plots/accuracy_vs_round.png",
                 "plots/epsilon_per_client.png"):
        assert (root / name).is_file(), name
    inversion = json.loads((root / "eps-inf_seed-0" / "inversion.json").read_text())
    assert set(inversion) >= {"plain", "dp_sgd"} and inversion["dp_sgd"]["noise_std"] > 0
    # A second call reuses every finished run and audit (no new training)
    stamp = (root / "eps-2_seed-0" / "results.json").stat().st_mtime
    assert main(argv) == 0
    assert (root / "eps-2_seed-0" / "results.json").stat().st_mtime == stamp
