"""The package's import layers, as docs/design.md states them: every module of
src/tensorize_vllm_model has a rank, and no module imports one of a higher rank (module-level
and function-level imports count; ``if TYPE_CHECKING:`` ones do not). Also: vLLM is imported
only in ``integrations/vllm/``, and tensorizer's private names only in ``format/compat.py``.

The ranks, bottom to top (a module may import its own rank and those below); each folder of
the package is one layer, so a module's rank is its top folder's:

0 core                    1 storage          2 format           3 config
4 read                    5 artifacts, inspection               6 convert
7 integrations            8 cli, plugin, __main__

``config/plan.py`` sits with the config: it takes a config (imported for type checking only)
and reads no tensors file itself, so the config's vLLM-compatible check can ask it, and
every module above asks it which files to read or write.

``integrations/vllm/serialize.py`` sits with the rest of the vLLM integration: it drives a
vLLM engine (it starts one and calls its workers), so it is the top of the library, under
the command line only. The package root (``__init__.py``) is the facade: it re-exports names
lazily and is left out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import ROOT

PACKAGE = "tensorize_vllm_model"
SRC = ROOT / "src" / PACKAGE

RANKS = {
    "core": 0,
    "storage": 1,
    "format": 2,
    "config": 3,
    "read": 4,
    "artifacts": 5,
    "inspection": 5,
    "convert": 6,
    "integrations": 7,
    "cli": 8,
    "plugin": 8,
    "__main__": 8,
}

# tensorizer's private names: only format/compat.py may use them.
PRIVATE_TENSORIZER = {"_metadata", "_TensorHeaderDeserializer", "_crypt", "_crypt_info"}


def _modules() -> dict[str, Path]:
    """Every module's dotted name below the package root -> its file."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute target, imported names, line) of every import of `path`."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_nodes(tree)
    package = [PACKAGE, *module.split(".")]
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names], node.lineno))
    return found


def _internal_targets(target: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """The package modules an import reaches (``from . import storage`` reaches storage)."""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return []
    inner = target[len(PACKAGE) + 1 :]
    subs = [f"{inner}.{name}".lstrip(".") for name in names]
    reached = [sub for sub in subs if sub in modules]
    if inner and len(reached) < len(subs):
        reached.append(inner)
    return reached


def _rank(module: str) -> int:
    return RANKS[module.split(".")[0]]


def test_every_module_has_a_rank():
    assert sorted({m.split(".")[0] for m in _modules()} - set(RANKS)) == []


def test_imports_go_downwards_only():
    modules = _modules()
    offenders = []
    for module, path in modules.items():
        for target, names, line in _imports(module, path):
            for reached in _internal_targets(target, names, modules):
                if _rank(reached) > _rank(module):
                    offenders.append(f"{path.relative_to(SRC)}:{line} {module} -> {reached}")
    assert offenders == []


def test_vllm_is_imported_only_by_the_vllm_integration():
    offenders = [
        f"{path.relative_to(SRC)}:{line} imports {target}"
        for module, path in _modules().items()
        if not module.startswith("integrations.vllm")
        for target, _, line in _imports(module, path)
        if target == "vllm" or target.startswith("vllm.")
    ]
    assert offenders == []


def test_tensorizer_private_names_only_in_compat():
    offenders = []
    for module, path in _modules().items():
        if module == "format.compat":
            continue
        for target, names, line in _imports(module, path):
            if target != "tensorizer" and not target.startswith("tensorizer."):
                continue
            private = [n for n in [*target.split(".")[1:], *names] if n.startswith("_")]
            if private or PRIVATE_TENSORIZER & set(names):
                offenders.append(f"{path.relative_to(SRC)}:{line} {target} {names}")
    assert offenders == []


def test_only_settings_reads_the_environment():
    """``os.environ``/``os.getenv`` only in core/settings.py (cli/configs.py sets vLLM's and the
    AWS SDK's variables from flags, which it may)."""
    offenders = [
        f"{path.relative_to(SRC)}:{number}"
        for module, path in _modules().items()
        if module not in ("core.settings", "cli.configs")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "os.environ" in line or "os.getenv" in line
    ]
    assert offenders == []


# The names that decide which tensors file a load or a serialize uses (format/names.py).
FILE_NAMING = {"tensors_uri", "rank_uri", "DEFAULT_TENSORS_NAME", "SHARDED_TENSORS_NAME"}


def test_only_plan_names_tensors_files():
    """Which file a load or serialize reads or writes is decided in config/plan.py only (issue 18):
    no other module imports the names that build a tensors file's URI. config/ may (it
    fills in ``tensorizer_uri`` from ``tensorizer_dir`` as vLLM's config does)."""
    offenders = [
        f"{path.relative_to(SRC)}:{line} imports {sorted(FILE_NAMING & set(names))}"
        for module, path in _modules().items()
        if module
        not in ("config.plan", "format.names", "format", "config", "config.tensorizer_config")
        for target, names, line in _imports(module, path)
        if target.endswith("format.names") and FILE_NAMING & set(names)
    ]
    assert offenders == []


def test_design_states_the_layers_the_test_enforces():
    """docs/design.md's ranks, bottom to top, are this module's `RANKS` (moved here from
    tests/contract/test_docs.py, which may not import a test module)."""
    text = " ".join((ROOT / "docs" / "design.md").read_text().split())
    ranks = text.split("Bottom to top: ", 1)[1].split(". A module may import", 1)[0]
    stated = {}
    for group in ranks.split(";"):
        rank, names = group.strip().split(" ", 1)
        for name in re.findall(r"`([^`]+)`", names):
            stated[name.removesuffix(".py").removesuffix("/")] = int(rank)
    assert stated == RANKS
