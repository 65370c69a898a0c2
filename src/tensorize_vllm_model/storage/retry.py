"""One retry policy for remote reads, shared by every remote backend (HTTP, S3).

A byte range is asked for up to `RetryPolicy.attempts` times, waiting ``backoff * n``
seconds before attempt n + 1. What is retried: a connection that fails or drops, a response
that ends early, a stall (no data for the read timeout), and any `Unreachable` error. What
is not: every other `StorageError` (`NotFound`, `AccessDenied`, a refused request), raised
at once. After the last attempt, `Unreachable` lists what each attempt ran into.

`Body` turns a response (``http.client`` or botocore) into a raw stream read in bounded
pieces, reporting a read timeout as `TransferStalled` with the bytes received so far.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import StorageError, Unreachable

__all__ = [
    "RetryPolicy",
    "DEFAULT_POLICY",
    "TransferStalled",
    "Body",
    "fill",
    "read_range_into",
    "RetryingSource",
]


class TransferStalled(Exception):
    """No data arrived for the read timeout in the middle of a response; `received` is how
    many bytes of it had arrived. Internal: backends turn it into `errors.Stalled` or a
    retry."""

    def __init__(self, received: int):
        super().__init__(f"stalled after {received} bytes")
        self.received = received


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed range read is tried again."""

    attempts: int = 3
    backoff: float = 0.2  # seconds; attempt n + 1 waits backoff * n

    def pause(self, attempt: int) -> None:
        time.sleep(self.backoff * (attempt + 1))


DEFAULT_POLICY = RetryPolicy()


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


def fill(body: io.RawIOBase, view: memoryview) -> int:
    """Read `body` into `view` until it is full or the body ends; the count."""
    got = 0
    while got < len(view):
        count = body.readinto(view[got:])
        if not count:
            break
        got += count
    return got


def read_range_into(
    open_body: Callable[[int, int], io.RawIOBase],
    start: int,
    view: memoryview,
    *,
    name: str,
    peer: str,
    connection: str,
    timeout: float,
    transport_errors: tuple[type[BaseException], ...],
    after_failure: Callable[[], None] = lambda: None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> None:
    """Fill `view` with the bytes of `name` from `start` on, retrying as the policy says.

    Args:
        open_body: asks for bytes [start, stop) and returns the response's body; raises a
            `StorageError` (retried only when `Unreachable`) or one of `transport_errors`.
        peer, connection: how messages call the other side ("the server") and the link
            ("the connection to https://host").
        after_failure: called after each failed attempt (e.g. to drop a pooled connection).

    Raises:
        Unreachable: every attempt failed in transit (each one's cause listed).
        StorageError: the first error that retrying cannot help (`NotFound`, ...).
    """
    stop = start + len(view)
    tried: list[str] = []  # what each attempt ran into
    for attempt in range(policy.attempts):
        try:
            body = open_body(start, stop)
            try:
                got = fill(body, view)
            finally:
                body.close()
            if got == len(view):
                return
            tried.append(f"the response ended after {got} of {len(view)} bytes")
        except TransferStalled as e:
            tried.append(
                f"{peer} stalled after sending {e.received} of {len(view)} "
                f"bytes (no data for {timeout:g} s)"
            )
        except StorageError as e:
            if not isinstance(e, Unreachable):
                raise
            tried.append(str(e) or type(e).__name__)
        except transport_errors as e:
            tried.append(str(e) or type(e).__name__)
        after_failure()
        policy.pause(attempt)
    raise Unreachable(
        f"reading {name} failed at bytes {start}-{stop - 1} after {policy.attempts} attempts "
        f"({connection} dropped or timed out): {'; '.join(tried)}"
    )


class RetryingSource:
    """The read side of a remote `ranged.RangeSource` over `read_range_into` (the one retry
    policy): a backend's source sets the attributes below and implements `_open_range`."""

    name: str
    timeout: float
    peer = "the server"  # how messages call the other side
    transport_errors: tuple[type[BaseException], ...] = (OSError,)

    @property
    def connection(self) -> str:
        """How messages call the link ("the connection to https://host")."""
        return "the connection"

    def _open_range(self, start: int, stop: int) -> io.RawIOBase:
        """Ask for bytes [start, stop): the response's body."""
        raise NotImplementedError

    def _after_failure(self) -> None:
        """Called after each failed attempt (e.g. to drop a pooled connection)."""

    def read_range(self, start: int, stop: int) -> bytes:
        data = bytearray(stop - start)
        self.read_range_into(start, memoryview(data))
        return bytes(data)

    def read_range_into(self, start: int, view: memoryview) -> None:
        read_range_into(
            self._open_range,
            start,
            view,
            name=self.name,
            peer=self.peer,
            connection=self.connection,
            timeout=self.timeout,
            transport_errors=self.transport_errors,
            after_failure=self._after_failure,
        )
