"""The package's structure rules (issue 18), checked on the source itself:

- no import cycles between the modules of src/tensorize_vllm_model, counting imports inside
  functions too and skipping ``if TYPE_CHECKING:`` blocks;
- no function or method longer than 60 lines;
- no module longer than 400 lines;
- at most 6 modules loose at the package root (the rest live in the layer folders that
  tests/contract/test_layers.py ranks);
- ``ruff check``, ``ruff format --check`` and ``mypy`` (configured in pyproject.toml) pass.

Each test reports every offender in one failure message.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

SRC = ROOT / "src"
PACKAGE = "tensorize_vllm_model"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
MAX_LOOSE_MODULES = 6
LINTED = ["src", "tests", "benchmarks", "examples", "scripts"]


def _modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` as the
    package's own name)."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, outside ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules) -> set[str]:
    """The package modules that import statement `node` in module `name` names."""
    if isinstance(node, ast.Import):
        return {t for alias in node.names if (t := _deepest(alias.name, modules))}
    if node.level:
        anchor = name.split(".") if is_package else name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    targets = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        target = sub if sub in modules else _deepest(base, modules)
        if target:
            targets.add(target)
    return targets


def _deepest(dotted: str, modules) -> str | None:
    parts = dotted.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports. A package's ``__init__`` is not counted as
    a target of its own submodules (importing ``a.b.c`` runs ``a/__init__`` and
    ``a/b/__init__`` first; that is Python's doing, not a dependency)."""
    modules = _modules(src, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(name, is_package, node, modules)
        graph[name] = {t for t in edges if t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_counts_function_imports_not_type_checking_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
        "def f():\n    from .sub import b\n"
    )
    (pkg / "c.py").write_text("from pkg import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("import os\nfrom .. import c\nfrom . import d\n")
    (pkg / "sub" / "d.py").write_text("from pkg.sub import b\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.c": {"pkg.a"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c", "pkg.sub.d"},
        "pkg.sub.d": {"pkg.sub.b"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b", "pkg.sub.d"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 10, sorted(graph)  # the walk found the package
    found = cycles(graph)
    lines = []
    for component in found:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append(f"cycle among {', '.join(component)}:\n    " + "\n    ".join(edges))
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(lines)


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` for each function or method in src longer than `limit`."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    offenders.append(f"{where} {node.name} ({length} lines)")
    return offenders


def test_no_long_functions():
    offenders = long_functions()
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n  " + "\n  ".join(offenders)


def test_no_long_modules():
    offenders = [
        f"{path.relative_to(ROOT)} ({count} lines)"
        for path in sorted((SRC / PACKAGE).rglob("*.py"))
        if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n  " + "\n  ".join(offenders)


def test_few_modules_loose_at_the_package_root():
    loose = sorted(path.name for path in (SRC / PACKAGE).glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, f"{len(loose)} modules at the package root: {loose}"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", *LINTED], ["ruff", "format", "--check", *LINTED], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_linters_pass(command):
    proc = _run(*command)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-6000:]}{proc.stderr}"
