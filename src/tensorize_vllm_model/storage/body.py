"""A response body as a raw stream read in bounded pieces (`Body`), reporting a read
timeout as `TransferStalled` with the bytes received so far, and `fill`, which reads one
into a buffer or a sequence of buffers. Every remote backend (``http.client``/urllib3,
botocore, google-cloud-storage, azure-storage-blob responses) hands its responses to
storage/retry.py in this shape.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Body", "TransferStalled", "fill"]


class TransferStalled(Exception):
    """No data arrived for the read timeout in the middle of a response; `received` is how
    many bytes of it had arrived. Internal: backends turn it into `errors.Stalled` or a
    retry."""

    def __init__(self, received: int):
        super().__init__(f"stalled after {received} bytes")
        self.received = received


class Body(io.RawIOBase):
    """A response body as a raw stream, read at most `piece` bytes at a time.

    Args:
        readinto: fills a buffer from the response, returns the count (0 at the end).
        close: releases the response.
        piece: the most bytes one read asks for (what arrived before a stall is counted to
            within this).
        stall_errors: what the transport raises when no data came for its read timeout.
    """

    def __init__(
        self,
        readinto: Callable[[memoryview], int],
        close: Callable[[], None],
        *,
        piece: int,
        stall_errors: tuple[type[BaseException], ...],
    ):
        super().__init__()
        self._readinto = readinto
        self._close = close
        self._piece = piece
        self._stall_errors = stall_errors
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self._piece]
        try:
            count = self._readinto(view)
        except self._stall_errors:
            raise TransferStalled(self.received) from None
        self.received += count
        return count

    def close(self) -> None:
        if not self.closed:
            self._close()
        super().close()


def fill(body: io.RawIOBase, view: memoryview | Sequence[memoryview]) -> int:
    """Read `body` into `view` until it is full or the body ends; the count. A sequence
    of views is filled in turn from the one body (a scatter read)."""
    got = 0
    for each in [view] if isinstance(view, memoryview) else view:
        done = 0
        while done < len(each):
            count = body.readinto(each[done:])
            if not count:
                return got + done
            done += count
        got += done
    return got
