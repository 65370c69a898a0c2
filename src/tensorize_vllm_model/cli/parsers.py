"""The argparse parsers of the commands, built from the flag table in `flags`.

``serialize`` and ``deserialize`` take every vLLM engine flag (vLLM's own parser, from the
vLLM side); ``inspect``, ``verify`` and ``convert`` need neither vLLM nor its flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..config import TensorizerArgs
from .flags import COMMANDS, CONVERT_MODEL, ENGINE_TOP, TENSORIZER, add_flags

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

CONVERT_TOP_FLAGS = tuple(row.flag for row in CONVERT_MODEL)

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


def build_parser() -> argparse.ArgumentParser:
    """The parser: every vLLM engine flag, then the serialize/deserialize subcommands."""
    from ..vllm_integration.engine import make_parser

    parser = make_parser(prog=PROG, description=DESCRIPTION)
    add_flags(parser, ENGINE_TOP)
    subparsers = parser.add_subparsers(
        dest="command", metavar="{serialize,deserialize,inspect,verify,convert}"
    )
    for name, text in LISTED_COMMANDS.items():  # listed; parsed by their own parsers
        listed = subparsers.add_parser(name, help=text, add_help=False)
        listed.parse_known_args = _takes_the_rest  # type: ignore[method-assign,assignment]
    serialize = subparsers.add_parser(
        "serialize",
        help="Serialize a model to --serialized-directory",
        description="Load --model with vLLM and write its tensors, config and tokenizer to "
        "DIR/vllm/<model>/<suffix>/.",
    )
    add_flags(serialize, COMMANDS["serialize"])
    deserialize = subparsers.add_parser(
        "deserialize",
        help="Deserialize a model from --path-to-tensors to verify it can be loaded and used",
        description="Load the tensors into vLLM, generate from a prompt, print the load time.",
    )
    rows = COMMANDS["deserialize"]
    add_flags(deserialize, tuple(r for r in rows if r.group != TENSORIZER))
    group = TensorizerArgs.add_cli_args(deserialize)._action_groups[-1]
    add_flags(deserialize, tuple(r for r in rows if r.group == TENSORIZER), {TENSORIZER: group})
    return parser


def _takes_the_rest(
    args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """A listed command's parse here: it takes every argument after it, so the engine
    parser reports which command was given (`entry` then refuses the flags before it)."""
    return namespace or argparse.Namespace(), []


def build_file_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``inspect`` and ``verify``: they need neither vLLM nor its flags."""
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", description=FILE_COMMANDS[command])
    add_flags(parser, COMMANDS[command])
    return parser


def build_convert_parser() -> argparse.ArgumentParser:
    """The parser of ``convert``: a few model flags before the command, no vLLM."""
    from ..convert.writer import DTYPES

    parser = argparse.ArgumentParser(prog=PROG, description=CONVERT_DESCRIPTION)
    add_flags(parser, CONVERT_MODEL, overrides={"--dtype": {"choices": DTYPES}})
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{convert}")
    convert = subparsers.add_parser(
        "convert", help=CONVERT_DESCRIPTION, description=CONVERT_DESCRIPTION
    )
    add_flags(convert, COMMANDS["convert"])
    return parser
