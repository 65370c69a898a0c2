"""The argparse parsers, built from the flag table in `flags`, and `parse_command_line`.

A command line is ``[flags before the command] COMMAND [the command's flags]``. The flags
before it are parsed by a front parser that finds the command word (argparse skips flags'
values: ``--suffix convert`` is no command), and leaves the rest to the command's own parser
(`build_parser`). ``serialize`` and ``deserialize`` take every vLLM engine flag before
them (vLLM's own parser, `integrations.vllm.engine.make_parser`); ``convert`` takes its model
flags there; ``inspect`` and ``verify`` take none. Only a command line with engine flags
imports vLLM.
"""

from __future__ import annotations

import argparse
import functools
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from ..core.errors import ConfigError
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

# the commands that start no engine
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

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _NotThisParser(Exception):
    """The vLLM-free front parser cannot parse the flags before the command."""


class _ModelFrontParser(CommandParser):
    """The front parser without vLLM: convert's model flags; its errors are raised, so the
    engine front parser can try."""

    def error(self, message: str) -> NoReturn:
        raise _NotThisParser(message)


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
    from ..integrations.vllm.engine import make_parser

    make_parser(prog=PROG, description="vLLM's engine flags").parse_args([search])


def _add_command(parser: argparse.ArgumentParser) -> None:
    """A front parser's command word and, unparsed, every argument after it."""
    parser.add_argument("command", nargs="?", choices=COMMAND_HELP, metavar="COMMAND")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


@functools.cache
def engine_front_parser() -> argparse.ArgumentParser:
    """The front parser of serialize and deserialize: every vLLM engine flag, and the table's
    `ENGINE` flags (built once: about a second)."""
    from ..integrations.vllm.engine import make_parser

    parser = make_parser(prog=PROG, description=DESCRIPTION, add_help=False)
    add_flags(parser, ENGINE)
    _add_command(parser)
    return parser


def model_front_parser(*, probe: bool = False) -> argparse.ArgumentParser:
    """The front parser of convert, without vLLM: its model flags (`MODEL`). As a `probe`
    (it raises its errors; no flag required, any value taken) it finds the command of a
    command line whose flags before the command are all model flags."""
    from ..convert.writer import DTYPES

    if probe:
        parser: argparse.ArgumentParser = _ModelFrontParser(prog=PROG, add_help=False)
        add_flags(parser, MODEL, overrides={"--model": {"required": False}})
    else:
        parser = CommandParser(prog=PROG, add_help=False)
        add_flags(parser, MODEL, overrides={"--dtype": {"choices": DTYPES}})
    _add_command(parser)
    return parser


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of `command`'s own flags (those after it), from the table in `flags`."""
    parser = CommandParser(
        prog=f"{PROG} {command}",
        description=COMMAND_DESCRIPTIONS.get(command, COMMAND_HELP[command]),
        epilog=COMMAND_EPILOGS.get(command),
    )
    add_flags(parser, command)
    return parser


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """`argv` parsed: the flags before the command, ``command``, and the command's own flags,
    in one namespace (``model_given``: whether --model was given).

    Raises:
        ConfigError: a flag before a command that does not take it there, or after the
            command when it goes before it (both named).
        SystemExit: argparse's usage errors (one line, code 2), a command's --help (0).
    """
    argv = list(argv)
    front, engine = _parse_front(argv)
    command = front.command
    if command is None:
        _usage_error("a command is required: serialize, deserialize, inspect, verify or convert")
    if command in LISTED_COMMANDS and (engine or (command != "convert" and argv[0] != command)):
        raise _misplaced_flags(command, argv)
    if command in LISTED_COMMANDS:
        before = set(CONVERT_TOP_FLAGS) if command == "convert" else set()
    else:
        before = _option_strings(engine_front_parser())
    _check_flags_after(front.rest, command, before)
    args = build_parser(command).parse_args(front.rest, namespace=front)
    if command == "convert":  # its model flags again, checked: --model required, --dtype's
        model_front_parser().parse_args(argv, namespace=args)
    args.model_given = any(a == "--model" or a.startswith("--model=") for a in argv)
    return args


def _parse_front(argv: list[str]) -> tuple[argparse.Namespace, bool]:
    """The flags before the command, the command and the rest: parsed without vLLM when
    they can be (convert, inspect, verify), else by vLLM's engine parser; and whether it
    was vLLM's."""
    try:
        front = model_front_parser(probe=True).parse_args(argv)
        if front.command not in ("serialize", "deserialize"):
            return front, False
    except _NotThisParser:
        pass
    return engine_front_parser().parse_args(argv), True


def _usage_error(message: str) -> NoReturn:
    """A usage error of the whole command line: one line, exit code 2."""
    argparse.ArgumentParser(prog=PROG).exit(2, f"{PROG}: error: {message}\n")


def _check_flags_after(rest: list[str], command: str, before: set[str]) -> None:
    """Refuse a flag of `before` (vLLM's engine flags; convert's model flags) given after
    `command` (in `rest`) when the command does not take it (its flags: the table in
    `flags`): argparse would say only "unrecognized arguments"."""
    own = {"-h", "--help", *flag_names(command)}
    for arg in rest:
        flag = arg.partition("=")[0]
        if flag.startswith("-") and flag in before and flag not in own:
            raise ConfigError(
                f"{flag} goes before the command, not after it: "
                f"{PROG} ... {flag} VALUE {command} ..."
            )


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag `parser` takes (vLLM's engine flags, aliases such as ``-tp`` included).

    argparse has no public listing of a parser's flags; its ``_option_string_actions``
    (there since Python 3.2) holds every alias vLLM registers."""
    return set(parser._option_string_actions)


def _misplaced_flags(command: str, argv: list[str]) -> ConfigError:
    """The error for engine flags before ``inspect``, ``verify`` or ``convert``."""
    allowed = CONVERT_TOP_FLAGS if command == "convert" else ()
    flags = (a.partition("=")[0] for a in argv if a.startswith("-"))
    flag = next((f for f in flags if f not in allowed), argv[0])
    if command == "convert":
        return ConfigError(
            f"convert takes only {', '.join(CONVERT_TOP_FLAGS)} before it, not {flag}"
        )
    return ConfigError(
        f"{command} takes no flags before it (got {flag}); give its own flags after it: "
        f"{PROG} {command} URI [--keyfile KEYFILE] ..."
    )


COMMAND_DESCRIPTIONS = {
    "serialize": "Load --model with vLLM and write its tensors, config and tokenizer to "
    "DIR/vllm/<model>/<suffix>/.",
    "deserialize": "Load the tensors into vLLM, generate from a prompt, print the load time "
    "and what was checked.",
    "convert": CONVERT_DESCRIPTION,
}
COMMAND_EPILOGS = {
    "serialize": ENGINE_FLAGS_NOTE,
    "deserialize": ENGINE_FLAGS_NOTE,
    "convert": f"convert takes only {', '.join(CONVERT_TOP_FLAGS)} before the command (no "
    "other engine flag: it starts no engine).",
}
