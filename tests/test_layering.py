"""The direction of imports (STYLE.md): read from the source with ``ast``, nothing imported.

Every module of ``fedimg/`` is parsed; every ``import x`` and ``from x import y``
counts, at any depth (a function body's lazy import is still an edge), except under
``if TYPE_CHECKING:``. An edge goes to the most specific fedimg module named:
``from fedimg.data import loader`` is an edge to ``fedimg.data.loader``,
``from fedimg.data import Dataset`` one to ``fedimg.data``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "fedimg"
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every fedimg module."""
    return {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    is_package = modules()[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports(module: str) -> frozenset[str]:
    """Every dotted name ``module`` imports.

    A fedimg name is resolved to the most specific module; outside fedimg, where the
    source is not read, ``from flwr import simulation`` counts as ``flwr`` and
    ``flwr.simulation`` both (a rule on ``flwr.simulation`` must see it).
    """
    tree = ast.parse(modules()[module].read_text(), filename=str(modules()[module]))
    out: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        source = _resolve(module, node)
        for alias in node.names:
            candidate = f"{source}.{alias.name}"
            if candidate in modules():
                out.add(candidate)
            else:
                out.add(source)
                if not source.startswith("fedimg"):
                    out.add(candidate)
    return frozenset(out)


def fedimg_edges(module: str) -> set[str]:
    return {m for m in imports(module) if m in modules() and m != module}


def third_party(module: str) -> set[str]:
    return {m.split(".")[0] for m in imports(module)
            if m.split(".")[0] not in STDLIB and m.split(".")[0] != "fedimg"}


def _under(name: str, packages: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _members(*packages: str) -> list[str]:
    return [m for m in modules() if _under(m, packages)]


def _reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in fedimg_edges(stack.pop()) - seen:
            seen.add(nxt)
            stack.append(nxt)
    return seen


def import_cycles() -> list[list[str]]:
    """The strongly connected groups of the fedimg import graph (each one is a cycle)."""
    reach = {m: _reachable(m) for m in modules()}
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]})
              for m in modules() if m in reach[m]}
    return sorted(sorted(g) for g in groups)


def _describe(group: list[str]) -> str:
    return "; ".join(f"{m} -> {t}" for m in group for t in sorted(fedimg_edges(m))
                     if t in group)


def _violations(packages: tuple[str, ...], forbidden: Iterable[str]) -> list[str]:
    forbidden = tuple(forbidden)
    return sorted(f"{m} -> {target}" for m in _members(*packages) for target in imports(m)
                  if _under(target, forbidden))


# -- the reader itself, on hand-written sources --------------------------------------------

@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    """A package ``fedimg.{a, b}`` in a temporary tree, read instead of the real one."""
    root = tmp_path / "fedimg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_ROOT", root)
    modules.cache_clear(), imports.cache_clear()
    yield root
    monkeypatch.undo()
    modules.cache_clear(), imports.cache_clear()


def test_the_reader_sees_nested_and_relative_imports_but_not_type_checking(tiny_package):
    # Arrange
    (tiny_package / "b.py").write_text("X = 1\n")
    (tiny_package / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n    import flwr\n"
        "def f():\n    import ray\n    from fedimg.b import X\n    from flwr import simulation\n")
    # Act / Assert: `from . import b` and the lazy imports count; the TYPE_CHECKING one does not
    assert imports("fedimg.a") == {"typing", "typing.TYPE_CHECKING", "fedimg.b", "ray", "flwr",
                                   "flwr.simulation"}
    assert import_cycles() == []


def test_a_lazy_import_back_is_a_cycle(tiny_package) -> None:
    (tiny_package / "a.py").write_text("from fedimg.b import X\n")
    (tiny_package / "b.py").write_text("X = 1\ndef g():\n    from fedimg import a\n")
    cycles = import_cycles()
    assert cycles == [["fedimg.a", "fedimg.b"]]
    assert _describe(cycles[0]) == "fedimg.a -> fedimg.b; fedimg.b -> fedimg.a"


# -- the rules -----------------------------------------------------------------------------

def test_every_fedimg_module_parses_and_the_package_has_its_layers() -> None:
    names = set(modules())
    assert {"fedimg.config", "fedimg.data", "fedimg.serverapp.loop", "fedimg.build"} <= names


def test_the_import_graph_is_acyclic() -> None:
    cycles = import_cycles()
    assert cycles == [], "import cycles: " + " | ".join(_describe(g) for g in cycles)


def test_data_models_training_import_no_framework_and_no_upper_layer() -> None:
    bottom = ("fedimg.data", "fedimg.models", "fedimg.training")
    upper = ("flwr", "ray", "opacus", "fedimg.serverapp", "fedimg.clientapp",
             "fedimg.transport", "fedimg.simulation", "fedimg.privacy", "fedimg.audit",
             "fedimg.deploy", "fedimg.build")
    assert _violations(bottom, upper) == []


def test_config_imports_only_config_errors_and_light_libraries() -> None:
    allowed_fedimg = ("fedimg.config", "fedimg.errors")
    bad = sorted(f"{m} -> {t}" for m in _members("fedimg.config") for t in fedimg_edges(m)
                 if not _under(t, allowed_fedimg))
    bad += sorted(f"{m} -> {p}" for m in _members("fedimg.config") for p in third_party(m)
                  if p not in ("omegaconf", "hydra", "yaml"))
    assert bad == []


def test_transport_does_not_import_the_roles() -> None:
    assert _violations(("fedimg.transport",), ("fedimg.serverapp", "fedimg.clientapp",
                                               "fedimg.simulation.engine")) == []


def test_privacy_does_not_import_the_roles() -> None:
    assert _violations(("fedimg.privacy",), ("fedimg.serverapp", "fedimg.clientapp",
                                             "fedimg.audit", "fedimg.simulation",
                                             "fedimg.deploy")) == []


def test_only_the_simulation_engine_imports_ray_or_flower_simulation() -> None:
    importers = sorted({m for m in modules() for t in imports(m)
                        if _under(t, ("ray", "flwr.simulation"))})
    assert set(importers) <= {"fedimg.simulation.engine"}, importers


@pytest.mark.parametrize("module", ["fedimg.errors", "fedimg.registry", "fedimg.seeds"])
def test_the_leaves_import_no_fedimg_layer(module: str) -> None:
    # The errors, the registry and the seeds are what every layer may use: they import none.
    assert {t for t in fedimg_edges(module) if t not in ("fedimg.errors",)} == set()


# -- further rows of ARCHITECTURE.md's table -----------------------------------------------

BOTTOM = ("fedimg.data", "fedimg.models", "fedimg.training")
LEAVES = ("fedimg.config", "fedimg.errors", "fedimg.registry", "fedimg.seeds")


@pytest.mark.parametrize(("packages", "allowed"), [
    (BOTTOM, LEAVES),
    (("fedimg.reporting",), ("fedimg.config", "fedimg.errors")),
    (("fedimg.transport",), ("fedimg.data", *LEAVES)),
    (("fedimg.simulation.fleet", "fedimg.simulation.attacks", "fedimg.simulation.faults"),
     LEAVES),
    (("fedimg.privacy",), (*BOTTOM, *LEAVES)),
], ids=["bottom layer", "reporting", "transport", "simulated devices", "privacy"])
def test_a_layer_imports_only_the_layers_below_it(packages: tuple[str, ...],
                                                  allowed: tuple[str, ...]) -> None:
    bad = sorted(f"{m} -> {t}" for m in _members(*packages) for t in fedimg_edges(m)
                 if not _under(t, packages + allowed))
    assert bad == []


def test_only_privacy_imports_opacus_and_only_the_app_of_clientapp_imports_flower() -> None:
    opacus = sorted(m for m in modules() if "opacus" in third_party(m))
    assert all(_under(m, ("fedimg.privacy",)) for m in opacus), opacus
    client_flwr = sorted(m for m in _members("fedimg.clientapp") if "flwr" in third_party(m))
    # the ClientApp's handlers and its one Flower mod (secure aggregation's stages)
    assert client_flwr == ["fedimg.clientapp.app", "fedimg.clientapp.secure"]


def test_a_client_process_does_not_load_what_it_does_not_use() -> None:
    """A worker or site daemon imports the ClientApp, not scikit-learn, pandas or Opacus:
    those cost each process about 1.3 s and 140 MiB (BENCHMARKS.md 18.4). A DP run
    imports Opacus when it first accounts or trains privately."""
    import subprocess
    import sys

    # Act: a fresh interpreter, as a Ray worker or a SuperNode's ClientApp starts
    code = ("import sys, fedimg.clientapp.app; "
            "print(sorted(m for m in ('sklearn', 'pandas', 'opacus', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    # Assert
    assert out.stdout.strip().splitlines()[-1] == "[]"
