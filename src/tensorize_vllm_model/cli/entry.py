"""`main(argv) -> int`: pick the command's parser, run the command, turn errors into exit codes.

The one place that decides what the user sees when a command fails:
  - our errors (`TensorizeError`): one ``error: ...`` line on stderr, exit code 2;
  - argparse's usage errors: its own message, exit code 2 (returned: `main` never raises
    `SystemExit`; ``--help`` returns 0);
  - a closed stdout (``| head``): nothing more is printed, exit code 141 (as for SIGPIPE);
  - Ctrl-C or SIGTERM: one ``interrupted (SIGINT)`` line, exit code 130 or 143;
  - anything else: a traceback (a bug).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import interrupts
from ..errors import ConfigError, TensorizeError, entry_point
from . import commands
from .configs import check_model_path
from .flags import flag_names
from .parsers import (
    COMMAND_HELP,
    CONVERT_TOP_FLAGS,
    FILE_COMMANDS,
    LISTED_COMMANDS,
    PROG,
    build_convert_parser,
    build_file_parser,
    build_parser,
    print_engine_flags,
    top_help,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); return the exit code.

    Ctrl-C (SIGINT) or SIGTERM at any moment cleans up, prints one ``interrupted`` line and
    returns 130 or 143 (see `interrupts`)."""
    interrupts.install()
    try:
        with entry_point("cli"):  # messages name this command line's flags
            return _run(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse's usage errors (already printed) and --help
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly, as CLIs do
        _silence_stdout()
        return 128 + 13  # as if killed by SIGPIPE
    except TensorizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as e:
        print(f"interrupted ({e})", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # raised before the handler was installed, or by other code
        print("interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 128 + 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _run(argv: list[str]) -> int:
    before = argv[: next((i for i, a in enumerate(argv) if a in COMMAND_HELP), len(argv))]
    if "-h" in before or "--help" in before:
        print(top_help(), end="")
        return 0
    search = next((a for a in before if a.startswith("--help=")), None)
    if search is not None:  # vLLM's engine flags: all, or those matching a word
        print_engine_flags(search)
    if argv and argv[0] in FILE_COMMANDS:
        args = build_file_parser(argv[0]).parse_args(argv[1:])
        return commands.inspect_or_verify(argv[0], args)
    if _convert_command(argv):
        _check_flags_after(argv, "convert", set(CONVERT_TOP_FLAGS))
        args = build_convert_parser().parse_args(argv)
        check_model_path(args.model)
        return commands.convert(args)
    parser = build_parser()
    command = next((a for a in argv if a in ("serialize", "deserialize")), None)
    if command is not None:
        _check_flags_after(argv, command, _option_strings(parser))
    args = parser.parse_args(argv)  # argparse finds the command word, past flags' values
    if args.command in LISTED_COMMANDS:  # engine flags before a command that takes none
        raise _misplaced_flags(args.command, argv)
    args.model_given = any(a == "--model" or a.startswith("--model=") for a in argv)
    if args.command is None:
        parser.error("a command is required: serialize, deserialize, inspect, verify or convert")
    check_model_path(args.model)
    if args.command == "serialize":
        return commands.serialize(args)
    return commands.deserialize(args)


def _convert_command(argv: list[str]) -> bool:
    """Whether `argv` is convert's model flags (each with its value), then ``convert``."""
    i = 0
    while i < len(argv) and argv[i] != "convert":
        flag, has_value, _ = argv[i].partition("=")
        if flag not in CONVERT_TOP_FLAGS:
            return False
        i += 1 if has_value else 2
    return i < len(argv)


def _check_flags_after(argv: list[str], command: str, before: set[str]) -> None:
    """Refuse a flag of `before` (vLLM's engine flags; convert's model flags) given after
    `command` when the command does not take it (its flags: the table in `flags`): argparse
    would say only "unrecognized arguments"."""
    own = {"-h", "--help", *flag_names(command)}
    for arg in argv[argv.index(command) + 1 :]:
        flag = arg.partition("=")[0]
        if flag.startswith("-") and flag in before and flag not in own:
            raise ConfigError(
                f"{flag} goes before the command, not after it: "
                f"{PROG} ... {flag} VALUE {command} ..."
            )


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag `parser` takes (vLLM's engine flags, aliases such as ``-tp`` included).

    argparse has no public listing of a parser's flags; its ``_option_string_actions``
    (there since Python 3.2) is the one that holds every alias vLLM registers."""
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
