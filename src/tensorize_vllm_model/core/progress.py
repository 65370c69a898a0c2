"""Progress of long reads and writes, shown the way vLLM's own weight loaders show theirs.

On a terminal, work of at least `MIN_BYTES` gets a tqdm bar (bytes done, GB/s, time left),
as vLLM's safetensors loader draws one per checkpoint. Not on a terminal (a log file, a
service), it gets one log line every `LOG_EVERY` seconds instead of a bar. Short work shows
nothing. The bar never replaces the final figures the callers log ("Deserialized X GB in
Y s (Z GB/s) from URI").

Callers wrap the work in `progress(...)` and call the function it yields with the number of
bytes each step finished (from any thread):

    with progress("Deserializing", total_bytes, logger=logger) as advance:
        for tensor in ...:
            advance(tensor.nbytes)

The commands ``serialize``, ``deserialize``, ``verify``, ``convert`` and loads through the
vLLM plug-in use it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from .redaction import scrubbing

__all__ = ["LOG_EVERY", "MIN_BYTES", "Advance", "progress", "resize"]

MIN_BYTES = 1_000_000_000  # work under 1 GB takes about a second here: no progress shown
LOG_EVERY = 10.0  # seconds between log lines when not on a terminal

_default_logger = scrubbing("tensorize_vllm_model")


class _Progress:
    """Counts bytes done (thread-safe) and shows them on a bar or in log lines."""

    def __init__(
        self,
        description: str,
        total: int,
        stream: TextIO,
        log_every: float,
        logger: logging.Logger,
        bar: bool,
    ):
        self.description, self.total, self.stream = description, total, stream
        self.log_every, self.logger = log_every, logger
        self.done = 0
        self.started = self.logged = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=description,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                file=stream,
            )

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)
                return
            now = time.monotonic()
            if now - self.logged >= self.log_every and self.done < self.total:
                self.logged = now
                self._log(now - self.started)

    def resize(self, total: int) -> None:
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def _log(self, elapsed: float) -> None:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f"about {(self.total - self.done) / rate:.0f} s left" if rate else "starting"
        line = (
            f"{self.description}: {self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB "
            f"({100 * self.done / max(self.total, 1):.0f}%), {rate / 1e9:.2f} GB/s, {left}"
        )
        if self.logger.hasHandlers() and self.logger.isEnabledFor(logging.INFO):
            self.logger.info("%s", line)
        else:  # nothing configured logging (a plain command): the line goes to the stream
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Advance:
    """What `progress` yields: call it with the bytes just done; `resize(total)` when the
    work turns out to be a different size (a rank that reads only its share of a file)."""

    def __init__(self, shown: _Progress | None = None):
        self._shown = shown

    def __call__(self, nbytes: int) -> None:
        if self._shown is not None:
            self._shown.advance(nbytes)

    def resize(self, total: int) -> None:
        if self._shown is not None:
            self._shown.resize(total)


def resize(advance: Callable[[int], None] | None, total: int) -> None:
    """`advance.resize(total)` where `advance` came from `progress` (else nothing)."""
    if isinstance(advance, Advance):
        advance.resize(total)


@contextlib.contextmanager
def progress(
    description: str,
    total: int,
    *,
    stream: TextIO | None = None,
    min_bytes: int | None = None,
    log_every: float | None = None,
    logger: logging.Logger | None = None,
    enabled: bool = True,
) -> Iterator[Advance]:
    """Show the progress of work on `total` bytes while the block runs.

    Args:
        description: what is being done, e.g. "Deserializing" (the bar's label).
        total: the bytes the work will have done when complete.
        stream: where the bar (or, without a configured logger, the lines) goes; standard
            error by default. A bar is drawn only when it is a terminal (``isatty()``).
        min_bytes: work under this many bytes shows nothing (default `MIN_BYTES`).
        log_every: seconds between log lines when `stream` is not a terminal (default
            `LOG_EVERY`; 0 logs at every step).
        logger: where the log lines go (``tensorize_vllm_model`` by default); when it has no
            handler, the lines are written to `stream`.
        enabled: False shows nothing (e.g. every rank but the first of a parallel load).

    Yields:
        ``advance(nbytes)``: call it, from any thread, each time `nbytes` more are done;
        ``advance.resize(total)`` changes the total (the bar or log lines follow).
    """
    stream = sys.stderr if stream is None else stream
    minimum = MIN_BYTES if min_bytes is None else min_bytes
    if not enabled or total < minimum or stream is None:
        yield Advance()
        return
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        terminal = False
    shown = _Progress(
        description,
        total,
        stream,
        LOG_EVERY if log_every is None else log_every,
        logger or _default_logger,
        bar=terminal,
    )
    try:
        yield Advance(shown)
    finally:
        shown.close()
