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

import os
import sys
from collections.abc import Sequence

from ..core import interrupts
from ..core.errors import TensorizeError, entry_point
from . import commands
from .configs import check_model_path
from .parsers import (
    COMMAND_HELP,
    FILE_COMMANDS,
    parse_command_line,
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
    _answer_help_before_the_command(argv)
    args = parse_command_line(argv)
    if args.command in FILE_COMMANDS:
        return commands.inspect_or_verify(args.command, args)
    check_model_path(args.model)
    if args.command == "convert":
        return commands.convert(args)
    if args.command == "serialize":
        return commands.serialize(args)
    return commands.deserialize(args)


def _answer_help_before_the_command(argv: list[str]) -> None:
    """``--help`` before the command: the short top-level help; ``--help=WORD``: vLLM's
    engine flags matching WORD (``all``: every one). Exits 0 (`SystemExit`).

    Answered here, before any parser, because of vLLM's parser (vLLM 0.32,
    ``FlexibleArgumentParser``): its ``parse_args`` turns ``--help=WORD`` into ``--help``
    (keeping WORD in a class attribute), and its ``--help`` prints a summary of its config
    groups, not this command line's."""
    end = next((i for i, a in enumerate(argv) if a in COMMAND_HELP), len(argv))
    before = argv[:end]
    if "-h" in before or "--help" in before:
        print(top_help(), end="")
        raise SystemExit(0)
    search = next((a for a in before if a.startswith("--help=")), None)
    if search is not None:
        print_engine_flags(search)
