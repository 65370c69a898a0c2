"""Every code block of README.md and docs/*.md works as pasted (issue 33).

The blocks are read from the files themselves, so a block edited or added later is checked
too. Each command of a ``bash`` block is checked by what it runs:

* ``python -m tensorize_vllm_model ...``: in the blocks listed in `RUN` it runs for real,
  in the order of `RUN`, with the README's example paths (``/data/opt-125m``,
  ``/data/llama``, ``/models``, ``/keys``) pointing at tiny models and a temporary
  directory, and the CPU flags the README asks for on vLLM's CPU backend added to the
  commands that start vLLM. Elsewhere it is parsed by the command's own parser (a
  GPU count, a bucket, a LoRA adapter or minutes of work would be needed to run it).
* ``vllm serve ...``: parsed by ``vllm serve``'s own parser (serving a tensorized model is
  covered by tests/e2e/test_vllm_remote.py and test_vllm_roundtrip.py; an engine start here
  would cost 30 s for no new check).
* ``make TARGET``: the Makefile has the target. ``.venv/bin/python SCRIPT --flag``: the
  script exists and knows each flag. Other tools: the executable exists.

A ``python`` block in `RUN` runs as a script (a fresh process: vLLM spawns its workers, so
an ``LLM(...)`` script needs its ``__main__`` guard, which this run proves); others are
compiled, and one that starts vLLM must have the guard.

Engine starts: three (the serialize, the ``LLM`` snippet, the deserialize), each a README
block run as pasted.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.commands import ENGINE_FLAGS, assert_ok, subprocess_env

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)
CLI = ("python", "-m", "tensorize_vllm_model")
# The README's example paths, replaced for a run (the rest of each command is as pasted).
EXAMPLE_PATH = re.compile(r"(?<![\w./-])/(data|models|keys)(?=/|\s|$|\")")
# What the README says to add on vLLM's CPU backend ("On vLLM's CPU backend add ..."), and
# what keeps a tiny model's engine start short here (not needed for it to work).
CPU_LLM_KWARGS = "gpu_memory_utilization=0.3, enforce_eager=True, max_model_len=256, "


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def read_blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(path.name, line, match.group(1), match.group(2)))
    return found


BLOCKS = read_blocks()

# The blocks run for real, in this order (each names a marker its block contains): the
# serialize makes the model the next ones load, inspect and verify.
RUN = {
    "serialize": "serialize --serialized-directory /models --suffix v1 --keyfile /keys/opt.key",
    "load": 'LLM("/models/vllm/opt-125m/v1"',
    "deserialize": "deserialize --serialized-directory /models/vllm/opt-125m/v1",
    "inspect": "inspect /models/vllm/opt-125m/v1",
    "convert": "--dtype bfloat16 convert",
    "module": "load_into_module(model, reader)",
}


def block_of(name: str) -> Block:
    [block] = [b for b in BLOCKS if RUN[name] in b.text]
    return block


def commands(text: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined (and lines within quotes,
    as bash reads them), comments dropped."""
    found, pending = [], ""
    for line in text.replace("\\\n", " ").splitlines():
        pending += line + "\n"
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        if argv:
            found.append(argv)
        pending = ""
    assert not pending, f"unclosed quote in {text!r}"
    return found


def substitute(text: str, root: Path) -> str:
    return EXAMPLE_PATH.sub(lambda m: f"{root}/{m.group(1)}", text)


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_opt, tiny_llama) -> Path:
    """The README's example paths: /data/opt-125m and /data/llama (tiny models), /models
    and /keys (empty)."""
    root = tmp_path_factory.mktemp("readme")
    (root / "data").mkdir()
    (root / "data" / "opt-125m").symlink_to(tiny_opt)
    (root / "data" / "llama").symlink_to(tiny_llama)
    (root / "keys").mkdir()
    return root


def run_cli_block(name: str, root: Path) -> list[subprocess.CompletedProcess]:
    """Run every ``python -m tensorize_vllm_model`` command of block `name` (the CPU flags
    added to those that start vLLM); parse the rest (`check_command`)."""
    done = []
    for argv in commands(substitute(block_of(name).text, root)):
        if tuple(argv[:3]) != CLI:
            check_command(argv)
            continue
        args = argv[3:]
        if "serialize" in args or "deserialize" in args:
            args = [*ENGINE_FLAGS, *args]
        proc = subprocess.run(
            [sys.executable, "-m", "tensorize_vllm_model", *args],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=600,
            cwd=root,
        )
        assert_ok(proc)
        done.append(proc)
    return done


def run_python_block(name: str, root: Path) -> subprocess.CompletedProcess:
    """Run block `name` as a script, with the README's CPU setting added to ``LLM(...)``."""
    text = substitute(block_of(name).text, root)
    text = re.sub(
        r'load_format="tensorizer",\s*', f'load_format="tensorizer", {CPU_LLM_KWARGS}', text
    )
    script = root / f"{name}.py"
    script.write_text(text)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
        cwd=root,
    )
    assert_ok(proc)
    return proc


@pytest.fixture(scope="module")
def serialized(root) -> Path:
    """The README's serialize block, run: /models/vllm/opt-125m/v1, encrypted with a new
    key in /keys/opt.key."""
    [proc] = run_cli_block("serialize", root)
    directory = root / "models" / "vllm" / "opt-125m" / "v1"
    assert proc.stdout.strip().splitlines()[-1] == str(directory)
    assert f"key saved to {root}/keys/opt.key (mode 0600)" in proc.stdout
    return directory


@pytest.fixture(scope="module")
def converted(root) -> Path:
    """The README's convert block, run (its ``vllm serve`` line parsed)."""
    [proc] = run_cli_block("convert", root)
    directory = root / "models" / "vllm" / "llama" / "v1"
    assert proc.stdout.strip().splitlines()[-1] == str(directory)
    return directory


# -- blocks run for real -------------------------------------------------------------------


@pytest.mark.slow
def test_load_snippet_runs_as_a_script(serialized, root):
    proc = run_python_block("load", root)
    assert proc.stdout.strip()  # the generated text (random weights: noise)


@pytest.mark.slow
def test_deserialize_block_says_what_it_checked(serialized, root):
    [proc] = run_cli_block("deserialize", root)
    assert (
        f"decrypted with the key in {root}/keys/opt.key; every tensor's hash checked" in proc.stdout
    )


@pytest.mark.slow
def test_inspect_and_verify_block(serialized, root):
    listing, as_json, verified = run_cli_block("inspect", root)
    assert f"{serialized}/model.tensors" in listing.stdout.splitlines()[0]
    [report] = json.loads(as_json.stdout)["files"]
    assert report["encrypted"] and report["record"]["tensor_parallel_size"] == 1
    assert verified.stdout.startswith(f"OK {serialized}/model.tensors: ")
    assert "decrypted with the key" in verified.stdout


def test_convert_block_and_the_load_into_module_snippet(converted, root):
    proc = run_python_block("module", root)
    assert proc.stdout.strip().endswith("GB/s")


# -- every other block: parsed, or its tool found -----------------------------------------


@pytest.mark.parametrize(
    "block",
    [b for b in BLOCKS if not any(marker in b.text for marker in RUN.values())],
    ids=str,
)
def test_every_other_block_parses(block):
    if block.lang == "python":
        compile(block.text, str(block), "exec")
        if "LLM(" in block.text or "tensorize_vllm_model(" in block.text:
            assert 'if __name__ == "__main__":' in block.text, f"{block}: vLLM needs the guard"
    elif block.lang == "bash":
        for argv in commands(block.text):
            check_command(argv)
    else:
        assert block.lang == "ini", f"{block}: a {block.lang} block; say here how to check it"


def check_command(argv: list[str]) -> None:
    """Parse a command that is not run: by its own parser, or find its tool."""
    if tuple(argv[:3]) in (CLI, (".venv/bin/python", *CLI[1:])):
        parse_cli(argv[3:])
    elif argv[:2] in (["vllm", "serve"], [".venv/bin/vllm", "serve"]):
        parse_vllm_serve(argv[2:])
    elif argv[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        assert all(re.search(rf"^{t}:", makefile, re.M) for t in argv[1:]), argv
    elif argv[0] == "export":
        pass  # the user's own endpoint and keys
    elif argv[0] == "flock":
        check_command(argv[2:])
    elif argv[0].endswith("python") and argv[1].endswith(".py"):
        source = (ROOT / argv[1]).read_text()
        flags = [a.split("=")[0].strip("[") for a in argv[2:] if a.lstrip("[").startswith("--")]
        assert all(flag in source for flag in flags), argv
    elif argv[0].endswith("python") and argv[1] == "-m":
        assert argv[2] == "pytest", argv
        check_pytest(argv[3:])
    else:
        assert (ROOT / argv[0]).exists() or argv[0].startswith(".venv/bin/"), argv


def check_pytest(args: list[str]) -> None:
    """A pytest command's test paths exist and its ``-m`` expression names registered
    markers only (pyproject.toml), so a documented command selects what it says."""
    import tomllib

    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    markers = {line.split(":")[0] for line in ini["markers"]}
    args = iter(args)
    for arg in args:
        if arg == "-m":
            words = set(re.findall(r"[A-Za-z_]+", next(args))) - {"and", "or", "not"}
            assert words <= markers, f"unregistered markers {sorted(words - markers)}"
        elif arg in ("-k", "-p"):
            next(args)
        elif not arg.startswith("-"):
            assert (ROOT / arg.split("::")[0]).exists(), f"pytest path {arg} does not exist"


@functools.cache
def serve_parser():
    """``vllm serve``'s own parser."""
    try:  # vLLM 0.32
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.34 moved it
        from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def parse_cli(args: list[str]) -> None:
    from tensorize_vllm_model.cli import parse_command_line

    parse_command_line(args)  # a usage error exits


def parse_vllm_serve(args: list[str]) -> None:
    parsed = serve_parser().parse_args(args)
    if parsed.model_loader_extra_config is not None:
        assert isinstance(parsed.model_loader_extra_config, dict), args
