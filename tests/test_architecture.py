"""The layers of docs/architecture.md, checked on the source: imports point one way, no cycles, and the
collector shares nothing with the library but the protocol package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pyodlog", "pyodlog_collector", "pyodlog_protocol")

# Each module may import modules of its own level or below. Order from the bottom up.
LAYERS: list[tuple[str, ...]] = [
    ("pyodlog_protocol", "pyodlog._version", "pyodlog._extension", "pyodlog._checks"),
    ("pyodlog.ops",),
    ("pyodlog.structures",),
    ("pyodlog.io", "pyodlog.distributed"),
    ("pyodlog.sync",),
    ("pyodlog.monitoring",),
    ("pyodlog.models",),
    ("pyodlog.analysis",),
    ("pyodlog.viewer",),
    ("pyodlog.cli", "pyodlog.demo", "pyodlog.demokit", "pyodlog.__main__", "pyodlog"),
]
# The top of the stack is the only part of the library allowed to reach the collector.
MAY_IMPORT_COLLECTOR = ("pyodlog.cli",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int:
    best, best_len = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, only for type checking) for every import of our packages in a file."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for grandchild in child.body:
                    visit_one(grandchild, True)
                for grandchild in child.orelse:
                    visit_one(grandchild, typing_only)
            else:
                visit_one(child, typing_only)

    def visit_one(node: ast.AST, typing_only: bool) -> None:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((name, typing_only))
        visit(node, typing_only)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    return {module_name(p): imports_of(p) for p in files}


def test_every_module_has_a_layer():
    assert [m for m in graph() if level(m) < 0 and not m.startswith("pyodlog_collector")] == []


def test_imports_point_down_the_layers():
    upward = []
    for module, imported in graph().items():
        if module.startswith("pyodlog_collector") or module == "pyodlog":
            continue  # the collector is checked below; the package's lazy __init__ re-exports all
        for target, _ in imported:
            if target.startswith("pyodlog_collector"):
                continue
            if level(target) > level(module):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_library_never_imports_the_collector_and_the_collector_never_the_library():
    crossings = []
    for module, imported in graph().items():
        for target, _ in imported:
            if module.startswith("pyodlog_collector"):
                if target.split(".")[0] == "pyodlog":
                    crossings.append(f"{module} -> {target}")
            elif target.startswith("pyodlog_collector") and module not in MAY_IMPORT_COLLECTOR:
                crossings.append(f"{module} -> {target}")
    assert crossings == []


def test_there_is_no_import_cycle():
    edges = {
        module: {
            t
            for t, typing_only in imported
            if not typing_only and t != module and not module.startswith(t + ".")
        }
        for module, imported in graph().items()
    }
    edges.pop("pyodlog", None)  # lazy: imports nothing at run time but _version
    for targets in edges.values():
        targets.discard("pyodlog")
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt in edges and state.get(nxt) is None:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(edges):
        if state.get(module) is None:
            walk(module, [module])
    assert cycles == []


def test_the_collector_starts_without_torch_or_the_library():
    code = (
        "import sys; import pyodlog_collector.cli, pyodlog_collector.http, pyodlog_collector.storage; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m == 'pyodlog' or m.startswith('pyodlog.')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
