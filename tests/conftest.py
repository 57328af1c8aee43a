"""Shared pytest fixtures: Flower's task identity, the real-data root, tiny run overrides.

Tests marked ``slow`` (the real Ray engine, deployments, the zoo's largest models) run
when ``FEDIMG_SLOW=1`` is set, as ``.ci/run`` does; otherwise they are skipped with a
line saying how to run them, so that ``python -m pytest`` stays a check of minutes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # offline_grid


SLOW_ENV = "FEDIMG_SLOW"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``slow`` tests unless ``FEDIMG_SLOW=1`` (CI sets it) or ``-m slow`` asks."""
    if os.environ.get(SLOW_ENV) == "1" or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason=f"slow: run with {SLOW_ENV}=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _flower_task_identity() -> None:
    """Flower needs a task identity in the process before Messages can be built."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1


def _shared_data_root() -> Path | None:
    env = os.environ.get("FEDIMG_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data root (../shared/data or $FEDIMG_DATA); skips the test if absent."""
    root = _shared_data_root()
    if root is None:
        pytest.skip("real data not found: set FEDIMG_DATA or place ../shared/data")
    return root


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """Overrides for a seconds-long run: 2 clients, synthetic 32 px images, 1 round."""
    return ["rounds=1", "clients=2", "data.source=synthetic", "data.image_size=32",
            "data.synthetic.train_size=96", "data.synthetic.test_size=32",
            "data.min_partition_size=8", "data.partitioner=iid", "data.quantity_skew=0",
            "output.progress=false"]
