"""The layers of docs/ARCHITECTURE.md hold: imports point one way (import-linter), with no cycle; files and
functions stay small (STYLE.md)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_layers_point_one_way() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = str(exe) if exe.exists() else shutil.which("lint-imports")
    if cmd is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_importing_forge_has_no_side_effects() -> None:
    """No torch flags flipped, no threads started, nothing written at import."""
    code = (
        "import threading, torch; before = (torch.get_num_threads(), torch.backends.cudnn.benchmark, "
        "threading.active_count()); import forge; "
        "after = (torch.get_num_threads(), torch.backends.cudnn.benchmark, threading.active_count()); "
        "assert before == after, (before, after)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_loading_models_does_not_import_the_compiler() -> None:
    """torch._dynamo (and Triton with it) costs about a second at import, and Triton reads TRITON_INTERPRET
    when imported: the model code applies torch.compiler.disable where it is called, never at import."""
    code = (
        "import sys, forge, forge.core.transformer, forge.models, forge.app, forge.server; "
        "loaded = [m for m in ('torch._dynamo', 'triton') if m in sys.modules]; assert not loaded, loaded"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- sizes and cycles (STYLE.md: files under ~600 lines, functions under ~60; nothing imports upward) ---------------
SRC = ROOT / "src"
PACKAGE = SRC / "forge"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
#: Triton kernels take every stride as its own argument and unroll their tiles by hand: exempt from the function limit.
LONG_FUNCTIONS_ALLOWED = PACKAGE / "kernels"


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_source_file_is_too_long() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by what they hold): {long}"


def test_no_function_outside_the_kernels_is_too_long() -> None:
    long = {}
    for path in _sources():
        if path.is_relative_to(LONG_FUNCTIONS_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno is not None
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` imports anywhere: at the top, in functions, under TYPE_CHECKING."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y, from .. import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from a import b` imports the module a.b when there is one, else a name from a.
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return found & modules


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e"]]


def test_no_import_cycle() -> None:
    """No module imports, even only for type checking or inside a function, one that imports it back."""
    paths = {_module_name(p): p for p in _sources()}
    modules = set(paths)
    graph = {name: _imports(path, modules) for name, path in paths.items()}
    assert graph["forge.app"], "the import graph is empty: the parser above is broken"
    cycles = _cycles(graph)
    edges = {tuple(cycle): sorted(f"{a} -> {b}" for a in cycle for b in graph[a] if b in cycle) for cycle in cycles}
    assert not cycles, f"import cycles: {edges}"
