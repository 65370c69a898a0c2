"""The argparse parsers of the commands, built from the flag table in `flags`.

``serialize`` and ``deserialize`` take every vLLM engine flag (vLLM's own parser, from the
vLLM side); ``inspect``, ``verify`` and ``convert`` need neither vLLM nor its flags.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from .flags import ENGINE, MODEL, add_flags, flag_names

PROG = "python -m tensorize_vllm_model"

DESCRIPTION = (
    "Serialize and deserialize vLLM models with CoreWeave's tensorizer. Serialized models "
    "load extremely quickly onto the GPU (or the CPU backend) from a local path, an "
    "HTTP(S) endpoint or S3. Tensor encryption is supported (libsodium)."
)

FILE_COMMANDS = {
    "inspect": "List the tensors, layout and encryption of a tensors file (no vLLM)",
    "verify": "Read every tensor, check its hash and key; exit 0 only if all are intact",
}

CONVERT_TOP_FLAGS = flag_names(MODEL)

CONVERT_DESCRIPTION = (
    "Convert a Hugging Face checkpoint (safetensors or .bin) into one tensorizer file that "
    "loads at any tensor/pipeline-parallel layout, each rank reading only its share. Needs "
    "neither vLLM nor a GPU. Writes DIR/vllm/<model>/<suffix>/ as serialize does."
)

# commands the engine parser lists in its help but leaves to their own parsers
LISTED_COMMANDS = {
    **FILE_COMMANDS,
    "convert": "Convert a Hugging Face checkpoint into one tensorizer file (no vLLM)",
}
SERIALIZE_HELP = "Serialize a model to --serialized-directory"
DESERIALIZE_HELP = "Load a serialized model in vLLM, generate from a prompt, print the load time"
COMMAND_HELP = {"serialize": SERIALIZE_HELP, "deserialize": DESERIALIZE_HELP, **LISTED_COMMANDS}


ENGINE_FLAGS_NOTE = (
    "vLLM's engine flags (--model, --dtype, --tensor-parallel-size, "
    "--gpu-memory-utilization, ...: the same as vllm serve's) go before the command; "
    f"`{PROG} --help=all` lists them all, `{PROG} --help=WORD` those whose group or name "
    "matches WORD (e.g. --help=ParallelConfig, --help=tensor-parallel)."
)


class CommandParser(argparse.ArgumentParser):
    """A command's own parser: its flags with their descriptions in ``--help``, and a usage
    error on one line (``PROG COMMAND: error: ...``, exit code 2)."""

    def __init__(self, *args: Any, listed_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listed_only = listed_only

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """A listed command (`listed_only`) takes every argument after it unparsed: the
        engine parser then reports which command was given, and `entry` refuses the engine
        flags before it. (An ``argparse.REMAINDER`` positional would not do: it leaves a
        first argument that starts with ``-`` to the parser.)"""
        if self.listed_only:
            return namespace or argparse.Namespace(), []
        return super().parse_known_args(args, namespace)


def top_help() -> str:
    """The top-level ``--help``: the commands, then where each one's flags are listed."""
    width = max(len(name) for name in COMMAND_HELP)
    lines = [
        f"usage: {PROG} [vLLM engine flags] {{serialize,deserialize}} [flags]",
        f"       {PROG} {{inspect,verify}} URI [flags]",
        f"       {PROG} --model SRC [--dtype D] convert [flags]",
        "",
        textwrap.fill(DESCRIPTION, 88),
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, text in COMMAND_HELP.items()),
        "",
        f"Each command's own flags: {PROG} COMMAND --help.",
        textwrap.fill(ENGINE_FLAGS_NOTE, 88),
    ]
    return "\n".join(lines) + "\n"


def print_engine_flags(search: str) -> None:
    """vLLM's help of its engine flags, searched as ``--help=WORD`` searches them (``all``:
    every flag); exits 0 after printing, as argparse's help does."""
    from ..vllm_integration.engine import make_parser

    make_parser(prog=PROG, description="vLLM's engine flags").parse_args([search])


def build_parser() -> argparse.ArgumentParser:
    """The parser: every vLLM engine flag, then the serialize/deserialize subcommands
    (``inspect``, ``verify`` and ``convert`` are listed, each taking every argument after
    it: `entry` parses them with their own parsers and refuses engine flags before them)."""
    from ..vllm_integration.engine import make_parser

    parser = make_parser(prog=PROG, description=DESCRIPTION)
    add_flags(parser, ENGINE)
    subparsers = parser.add_subparsers(
        dest="command",
        metavar="{serialize,deserialize,inspect,verify,convert}",
        parser_class=CommandParser,
    )
    for name, text in LISTED_COMMANDS.items():
        subparsers.add_parser(name, help=text, add_help=False, listed_only=True)
    serialize = subparsers.add_parser(
        "serialize",
        help=SERIALIZE_HELP,
        description="Load --model with vLLM and write its tensors, config and tokenizer to "
        "DIR/vllm/<model>/<suffix>/.",
        epilog=ENGINE_FLAGS_NOTE,
    )
    add_flags(serialize, "serialize")
    deserialize = subparsers.add_parser(
        "deserialize",
        help=DESERIALIZE_HELP,
        description="Load the tensors into vLLM, generate from a prompt, print the load time "
        "and what was checked.",
        epilog=ENGINE_FLAGS_NOTE,
    )
    add_flags(deserialize, "deserialize")
    return parser


def build_file_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``inspect`` and ``verify``: they need neither vLLM nor its flags."""
    parser = CommandParser(prog=f"{PROG} {command}", description=FILE_COMMANDS[command])
    add_flags(parser, command)
    return parser


def build_convert_parser() -> argparse.ArgumentParser:
    """The parser of ``convert``: a few model flags before the command, no vLLM."""
    from ..convert.writer import DTYPES

    parser = CommandParser(prog=PROG, description=CONVERT_DESCRIPTION)
    add_flags(parser, MODEL, overrides={"--dtype": {"choices": DTYPES}})
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{convert}")
    convert = subparsers.add_parser(
        "convert",
        help=CONVERT_DESCRIPTION,
        description=CONVERT_DESCRIPTION,
        epilog=f"convert takes only {', '.join(CONVERT_TOP_FLAGS)} before the command (no "
        "other engine flag: it starts no engine).",
    )
    add_flags(convert, "convert")
    return parser
