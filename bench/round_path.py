"""How much code one server round runs through: lines of the round-path files, and the
distinct lines the server executes in a tiny two-round simulation.

    python bench/round_path.py            # this tree's round path
    python bench/round_path.py --old      # the pre-redesign layout (run it in that tree)

The executed lines are traced with ``sys.settrace``/``threading.settrace`` over the
ServerApp thread (clients run in Ray workers, which are not traced). Figures:
BENCHMARKS.md §10.2.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW = ("serverapp/loop.py", "transport/grid.py", "serverapp/filters.py",
       "serverapp/callbacks.py", "serverapp/round_record.py", "serverapp/state.py",
       "serverapp/validation.py")
NEW_TRACED = NEW + ("transport/records.py", "transport/packing.py", "serverapp/checkpoint.py",
                    "serverapp/state_codec.py")
OLD = ("federation/rounds.py", "federation/grid.py", "federation/tracker.py",
       "federation/validation.py", "federation/records.py", "federation/packing.py",
       "federation/server.py")
OLD_TRACED = OLD[:-1] + ("federation/checkpoint.py",)
TINY = ["scenario=medical", "rounds=2", "clients=2", "data.source=synthetic",
        "data.image_size=32", "data.synthetic.train_size=96", "data.synthetic.test_size=32",
        "data.min_partition_size=8", "data.partitioner=iid", "data.quantity_skew=0",
        "output.progress=false", "output.plots=false"]


def code_lines(source: str) -> int:
    """Lines that are neither blank, comments nor docstrings."""
    docs: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and \
                isinstance(body[0].value.value, str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def traced_lines(files: tuple[str, ...]) -> int:
    """Distinct lines of ``files`` the server executes in a tiny two-round run."""
    hits: set[tuple[str, int]] = set()
    wanted = tuple(str(ROOT / "fedimg" / f) for f in files)

    def tracer(frame, event, arg):  # noqa: ANN001, ANN202 - sys.settrace's signature
        if frame.f_code.co_filename in wanted:
            if event in ("call", "line"):
                hits.add((frame.f_code.co_filename, frame.f_lineno))
            return tracer
        return None

    sys.path.insert(0, str(ROOT))
    from fedimg.simulate import run

    sys.settrace(tracer)
    threading.settrace(tracer)
    try:
        run([*TINY, f"hydra.run.dir={tempfile.mkdtemp(prefix='fedimg-trace-')}"])
    finally:
        sys.settrace(None)
        threading.settrace(None)
    return len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", action="store_true", help="the federation/ layout")
    args = parser.parse_args()
    files, traced = (OLD, OLD_TRACED) if args.old else (NEW, NEW_TRACED)
    sources = [(ROOT / "fedimg" / f).read_text() for f in files]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    executed = traced_lines(traced)
    print(f"files {len(files)}  lines {sum(len(s.splitlines()) for s in sources)}  "  # noqa: T201
          f"code lines {sum(code_lines(s) for s in sources)}  executed {executed}")


if __name__ == "__main__":
    main()
