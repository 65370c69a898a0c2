"""`main(argv) -> int`: pick the command's parser, run the command, turn errors into exit codes.

The one place that decides what the user sees when a command fails:
  - our errors (`TensorizeError`): one ``error: ...`` line on stderr, exit code 2;
  - argparse's usage errors: its own message, exit code 2 (`SystemExit`);
  - Ctrl-C or SIGTERM: one ``interrupted (SIGINT)`` line, exit code 130 or 143;
  - anything else: a traceback (a bug).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .. import interrupts
from ..errors import TensorizeError
from . import commands
from .configs import check_model_path
from .parsers import FILE_COMMANDS, build_convert_parser, build_file_parser, build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); return the exit code.

    Ctrl-C (SIGINT) or SIGTERM at any moment cleans up, prints one ``interrupted`` line and
    returns 130 or 143 (see `interrupts`)."""
    interrupts.install()
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except TensorizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as e:
        print(f"interrupted ({e})", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # raised before the handler was installed, or by other code
        print("interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 128 + 2


def _run(argv: list[str]) -> int:
    if argv and argv[0] in FILE_COMMANDS:
        args = build_file_parser(argv[0]).parse_args(argv[1:])
        return commands.inspect_or_verify(argv[0], args)
    if "convert" in argv:
        args = build_convert_parser().parse_args(argv)
        check_model_path(args.model)
        return commands.convert(args)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model_given = any(a == "--model" or a.startswith("--model=") for a in argv)
    if args.command is None:
        parser.error("a command is required: serialize, deserialize, inspect or verify")
    check_model_path(args.model)
    if args.command == "serialize":
        return commands.serialize(args)
    return commands.deserialize(args)
