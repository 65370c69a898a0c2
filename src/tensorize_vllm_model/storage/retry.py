"""The one retry policy of remote storage (S3, HTTP(S)), and who applies it to what.

`RetryPolicy` is the only place the numbers live: ``attempts`` (how many times one request,
one probe or one byte range is tried in all) and ``backoff`` (the pause this module makes
before attempt n + 1 is ``backoff * n`` seconds). `StreamOptions.retry` carries it
(`DEFAULT_POLICY` unless a caller gives another); nothing else counts attempts.

Two layers apply it, and no failure is retried by both:

=====================================  ==========================  =======================
failure                                S3                          HTTP(S)
=====================================  ==========================  =======================
no connection, reset, no answer        botocore (standard mode)    this module
  within the timeout, TLS handshake
HTTP 5xx, 429, S3 ``SlowDown`` /       botocore (standard mode)    this module
  ``InternalError`` / ``RequestTimeout``
the response body drops, ends early    this module                 this module
  or stalls (botocore cannot see it)
404 / 403, TLS certificate refused,    never: raised at once       never: raised at once
  any other refusal
=====================================  ==========================  =======================

botocore's standard retry mode is configured from the policy
(``total_max_attempts = attempts``, `RetryPolicy.botocore_retries`) and keeps its own waits
(AWS's standard: exponential with full jitter, 1 s base for throttling, 50 ms otherwise,
honouring ``x-amz-retry-after``), which is what S3 asks of a throttled client. For a byte
range both layers draw on ONE budget, an `Attempts` log per range: every request botocore
sends for the range is recorded in it (storage/s3.py's ``needs-retry`` hook, which also
stops botocore once the budget is spent), and so is every body that failed here. A range
is therefore tried ``attempts`` times in all, whatever mix of failures it meets, and a
failure botocore gave up on (`GaveUp`) is never tried again here.

After the last attempt: `Unreachable` naming the URI (credentials and signed query strings
redacted) and listing what each attempt ran into; `Throttled` (an `Unreachable`) when every
attempt was answered "slow down" (HTTP 503 / 429, S3 ``SlowDown``), saying what the server
kept answering. `NotFound`, `AccessDenied` and every other refusal are raised at once.

`Body`, `fill` and `TransferStalled` (storage/body.py) are the response side every backend
hands to this module.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..core.errors import ConfigError, StorageError, Throttled, Unreachable
from .body import Body, TransferStalled, fill

__all__ = [
    "RetryPolicy",
    "DEFAULT_POLICY",
    "Attempts",
    "throttled",
    "Transient",
    "GaveUp",
    "TransferStalled",
    "Body",
    "fill",
    "request",
    "read_range_into",
    "RetryingSource",
]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently remote storage is tried (see the module docstring).

    Attributes:
        attempts: tries of one request or byte range in all, the first included (>= 1).
        backoff: seconds; this module waits ``backoff * n`` after the n-th failed attempt
            (botocore's own request retries wait as botocore's standard mode says).

    Raises:
        ConfigError: attempts below 1 or a negative backoff.
    """

    attempts: int = 3
    backoff: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"retry attempts must be a positive integer, got {self.attempts!r}")
        if self.backoff < 0:
            raise ConfigError(f"retry backoff must be >= 0 seconds, got {self.backoff!r}")

    def pause(self, failed: int) -> None:
        """Wait before the next attempt, after `failed` failed ones."""
        time.sleep(self.backoff * failed)

    def botocore_retries(self) -> dict[str, Any]:
        """botocore's ``Config(retries=...)`` for this policy: standard mode, `attempts`
        requests in all (``total_max_attempts`` counts the first; ``max_attempts`` would
        not)."""
        return {"mode": "standard", "total_max_attempts": self.attempts}


DEFAULT_POLICY = RetryPolicy()


@dataclass
class Attempts:
    """What each attempt at one request or byte range ran into: the budget that every
    layer retrying it draws on (`RetryPolicy.attempts` in all)."""

    policy: RetryPolicy
    failures: list[str] = field(default_factory=list)
    # Per failure: the "slow down" answer it was ("503 SlowDown"), or None.
    throttled: list[str | None] = field(default_factory=list)

    def failed(self, what: str, throttled: str | None = None) -> None:
        self.failures.append(what)
        self.throttled.append(throttled)

    @property
    def used(self) -> int:
        return len(self.failures)

    @property
    def left(self) -> int:
        return self.policy.attempts - self.used

    def listing(self) -> str:
        """What each attempt ran into, in order; a failure repeated by consecutive attempts
        is listed once with its count ("...; HTTP 503 SlowDown (2 times)")."""
        groups: list[list[Any]] = []
        for failure in self.failures:
            if groups and groups[-1][0] == failure:
                groups[-1][1] += 1
            else:
                groups.append([failure, 1])
        return "; ".join(f"{text} ({n} times)" if n > 1 else text for text, n in groups)

    def throttling(self, what: str, peer: str) -> Throttled | None:
        """`Throttled` when every attempt was told to slow down, else None."""
        if not self.throttled or None in self.throttled:
            return None
        return throttled(what, peer, self.throttled[-1] or "", self.used)

    def unreachable(self, what: str, hint: str = "") -> Unreachable:
        """The error once the attempts ran out without an answer: each attempt's cause, then
        `hint` (what to check)."""
        return Unreachable(
            f"cannot reach {what}: no usable answer to {self.used} attempts: {self.listing()}"
            + (f"; {hint}" if hint else "")
        )


def throttled(what: str, peer: str, answer: str, attempts: int) -> Throttled:
    """The error for `peer` answering "slow down" (`answer`, e.g. ``HTTP 503 SlowDown``) to
    every one of `attempts` attempts at `what`."""
    return Throttled(
        f"{what}: {peer} kept answering {answer} to all {attempts} attempts (it is "
        "throttling requests); lower the request rate (fewer stream_kwargs workers) or try "
        "again later"
    )


class Transient(Exception):
    """A request failed in a way another attempt may fix (no connection, a 5xx or 429
    answer): raised by a backend whose requests this module retries (HTTP(S)).

    Args:
        what: what the attempt ran into, for messages (no credentials).
        throttled: the "slow down" answer ("503 Service Unavailable"), if it was one.
    """

    def __init__(self, what: str, throttled: str | None = None):
        super().__init__(what)
        self.what = what
        self.throttled = throttled


class GaveUp(Exception):
    """A lower layer (botocore) retried a request as the policy says and gave up; its
    attempts are in the `Attempts` log already: not to be tried again here."""

    def __init__(self, error: StorageError):
        super().__init__(str(error))
        self.error = error


def _length(view: memoryview | Sequence[memoryview]) -> int:
    return len(view) if isinstance(view, memoryview) else sum(len(v) for v in view)


def request(
    send: Callable[[], T],
    *,
    policy: RetryPolicy,
    name: str,
    peer: str,
    after_failure: Callable[[], None] = lambda: None,
) -> T:
    """`send()` until it returns, retrying each `Transient` failure as the policy says.

    For requests this module retries (HTTP(S)); S3's are retried by botocore.

    Args:
        name: what is asked for, for messages (a URI, credentials redacted).
        peer: how messages call the other side ("the server").
        after_failure: called after each failed attempt (e.g. to drop a pooled connection).

    Raises:
        Throttled: every attempt was told to slow down (HTTP 503 / 429).
        Unreachable: every attempt failed otherwise (each one's cause listed).
        StorageError: the first failure that another attempt cannot help (`NotFound`, ...).
    """
    log = Attempts(policy)
    while True:
        try:
            return send()
        except Transient as e:
            log.failed(e.what, e.throttled)
        after_failure()
        if log.left <= 0:
            raise log.throttling(f"reading {name}", peer) or log.unreachable(name) from None
        policy.pause(log.used)


def read_range_into(
    open_body: Callable[[int, int, Attempts], io.RawIOBase],
    start: int,
    view: memoryview | Sequence[memoryview],
    *,
    name: str,
    peer: str,
    connection: str,
    timeout: float,
    transport_errors: tuple[type[BaseException], ...],
    after_failure: Callable[[], None] = lambda: None,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> None:
    """Fill `view` with the bytes of `name` from `start` on, `policy.attempts` tries in all.
    `view` may be a sequence of views, filled in turn from one response (a scatter read:
    one request for bytes that go to several places).

    Args:
        open_body: asks for bytes [start, stop), returns the response's body; raises
            `Transient` (retried here), `GaveUp` (its layer, botocore, retried it and
            recorded each attempt in the `Attempts` given) or a `StorageError` (raised at
            once). `transport_errors` raised while reading the body: retried here.
        peer, connection: how messages call the other side ("the server") and the link
            ("the connection to https://host").
        after_failure: called after each failed attempt (e.g. to drop a pooled connection).

    Raises:
        Throttled: every attempt was told to slow down.
        Unreachable: the attempts ran out (each one's cause listed).
        StorageError: the first error that retrying cannot help (`NotFound`, ...).
    """
    stop = start + _length(view)
    log = Attempts(policy)
    while log.left > 0:
        try:
            if _try_range(open_body, start, view, log, peer, timeout, transport_errors):
                return
        except GaveUp as e:
            if not log.used:  # nothing recorded: the lower layer's own error says it all
                raise e.error from None
            break
        after_failure()
        if log.left > 0:
            policy.pause(log.used)
    raise log.throttling(f"reading {name} (bytes {start}-{stop - 1})", peer) or Unreachable(
        f"reading {name} failed at bytes {start}-{stop - 1} after {log.used} attempts "
        f"({connection} dropped or timed out): {log.listing()}"
    )


def _try_range(
    open_body: Callable[[int, int, Attempts], io.RawIOBase],
    start: int,
    view: memoryview | Sequence[memoryview],
    log: Attempts,
    peer: str,
    timeout: float,
    transport_errors: tuple[type[BaseException], ...],
) -> bool:
    """One attempt at filling `view`: True when it did; otherwise the failure is in `log`
    (`GaveUp` and other `StorageError`s are raised)."""
    length = _length(view)
    try:
        body = open_body(start, start + length, log)
        try:
            got = fill(body, view)
        finally:
            body.close()
        if got == length:
            return True
        log.failed(f"the response ended after {got} of {length} bytes")
    except TransferStalled as e:
        log.failed(
            f"{peer} stalled after sending {e.received} of {length} "
            f"bytes (no data for {timeout:g} s)"
        )
    except Transient as e:
        log.failed(e.what, e.throttled)
    except (GaveUp, StorageError):
        raise
    except transport_errors as e:
        log.failed(str(e) or type(e).__name__)
    return False


class RetryingSource:
    """The read side of a remote `ranged.RangeSource` over `read_range_into` (the one retry
    policy): a backend's source sets the attributes below and implements `_open_range`."""

    name: str
    size: int
    timeout: float
    etag: str | None = None  # the object's ETag when opened (HTTP ETag; S3 ETag), if given
    policy: RetryPolicy = DEFAULT_POLICY
    peer = "the server"  # how messages call the other side
    transport_errors: tuple[type[BaseException], ...] = (OSError,)
    supports_ranges = True  # `_open_range` answers byte ranges (HTTP sets it per server)

    @property
    def connection(self) -> str:
        """How messages call the link ("the connection to https://host")."""
        return "the connection"

    def _open_range(self, start: int, stop: int, log: Attempts) -> io.RawIOBase:
        """Ask for bytes [start, stop): the response's body (see `read_range_into`)."""
        raise NotImplementedError

    def _after_failure(self) -> None:
        """Called after each failed attempt (e.g. to drop a pooled connection)."""

    def open_sequential(self, start: int) -> io.RawIOBase:
        """The bytes from `start` to the end as one stream (``stream_kwargs`` ``ranges``
        false): by default one `_open_range` to the end, without retries."""
        return self._open_range(start, self.size, Attempts(self.policy))

    def _check_same(self, content_range: str | None, etag: str | None) -> None:
        """Refuse a ranged answer for an object that was replaced since this source was
        made: its ``Content-Range`` (``bytes a-b/total``) gives another length, or its
        ``ETag`` (RFC 9110; S3 GetObject) differs from the one the object had (a
        replacement of the same size).

        Raises:
            StorageError: naming the object, and what changed.
        """
        total = (content_range or "").rpartition("/")[2]
        if total.isdigit() and int(total) != self.size:
            raise StorageError(
                f"{self.name} changed while it was read: it is {total} bytes now, "
                f"{self.size} when it was opened; read it again"
            )
        if self.etag and etag and etag != self.etag:
            raise StorageError(
                f"{self.name} changed while it was read: its ETag is {etag} now, "
                f"{self.etag} when it was opened; read it again"
            )

    def read_range(self, start: int, stop: int) -> bytes:
        data = bytearray(stop - start)
        self.read_range_into(start, memoryview(data))
        return bytes(data)

    def read_range_into(self, start: int, view: memoryview | Sequence[memoryview]) -> None:
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
            policy=self.policy,
        )
