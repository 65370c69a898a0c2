"""Ctrl-C (SIGINT) and SIGTERM for the command line: end the command, clean up, exit 128+N.

The command line installs `install()`'s handler. A signal then raises `Interrupted` in the
main thread, which the command's clean-up sees like any error (staged files deleted, the
engine shut down) and `cli.main` turns into one ``interrupted (SIGINT)`` line and exit code
130 (SIGINT) or 143 (SIGTERM), as a shell reports a process ended by that signal.

`Interrupted` is deliberately not a `KeyboardInterrupt`: vLLM catches and drops
KeyboardInterrupt while it waits for its engine to start (``zmq_socket_ctx`` in
``vllm/utils/network_utils.py``, vLLM 0.32), so a Ctrl-C there used to be swallowed and the
serialize carried on and published. The signal is also remembered, and `check()` (called
before anything is published) raises it again should any other code swallow the exception.
After either signal the process ends within `GRACE_SECONDS`, cleaned up or not.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

__all__ = ["GRACE_SECONDS", "Interrupted", "check", "install"]

# After Ctrl-C or SIGTERM, the clean-up (staged files deleted, the engine shut down) has this
# long; then the process ends anyway, so an engine that does not shut down cannot hang it.
GRACE_SECONDS = 60.0

_received: list[int] = []  # the signals received, in order


class Interrupted(BaseException):
    """The command was interrupted by `signum` (SIGINT or SIGTERM). A BaseException, so that
    ``except Exception`` clean-up code lets it through, and not a KeyboardInterrupt, so that
    code that drops KeyboardInterrupt (vLLM's engine start-up) does not drop it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's code for "ended by this signal"


def install() -> None:
    """Handle SIGINT and SIGTERM in this process as described above (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _received.clear()
    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raise `Interrupted` if a signal arrived since `install()`, even if the exception it
    raised was swallowed somewhere: called before anything is published."""
    if _received:
        raise Interrupted(_received[0])


def _handler(signum: int, frame: object) -> None:
    first = not _received
    _received.append(signum)
    if first:
        threading.Thread(target=_end_after_grace, args=(signum,), daemon=True).start()
    raise Interrupted(signum)


def _end_after_grace(signum: int) -> None:
    time.sleep(GRACE_SECONDS)
    print(
        f"error: the clean-up after {signal.Signals(signum).name} took over "
        f"{GRACE_SECONDS:.0f} s; exiting",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)
