"""fedimg.config imports nothing heavier than the standard library and OmegaConf."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "flwr", "ray", "opacus", "torchvision")

# A meta-path finder that refuses the heavy packages, installed before fedimg is imported.
BLOCKER = textwrap.dedent(f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_the_blocker_blocks() -> None:
    result = _run("import torch\n")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


def test_validate_and_compose_import_without_torch_flwr_ray_opacus_torchvision() -> None:
    # Arrange: validate a default config, decode one, import and run composition
    code = """
        import fedimg.config
        from fedimg.config import FedimgConfig, from_json, to_json
        fedimg.config.validate(FedimgConfig())
        assert from_json(to_json(FedimgConfig())) == FedimgConfig()
        from fedimg.config.compose import compose_config
        cfg = compose_config("medical", ["hydra.run.dir=/tmp/fedimg-light", "data.augment=none"])
        assert cfg.data.augment == "none"
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not heavy, heavy
        print("ok")
    """
    # Act
    result = _run(code)
    # Assert
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
