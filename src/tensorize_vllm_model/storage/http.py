"""HTTP(S) URLs, read-only, through the standard library's ``http.client``.

Works with HTTP/1.0 and HTTP/1.1 servers. Byte ranges are used when the server offers them
(parallel read-ahead); otherwise the file is read as one sequential response. HTTPS uses the
system's trust store, or the CA bundle given (``ca_bundle``). Query strings (where signed URLs
keep their signatures) never appear in messages.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import urllib.parse

from ..errors import AccessDenied, NotFound, Stalled, StorageError, Unreachable
from . import retry
from .base import Backend
from .options import StreamOptions
from .retry import TransferStalled

__all__ = ["redact", "HTTPSource", "HTTPBackend"]

# Bytes per read from a response: what arrived before a stall is counted to within this.
_PIECE = 256 * 1024
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
# Answers worth another attempt (retry.py's policy); 429 and 503 mean "slow down".
_TRANSIENT_STATUSES = (429, 500, 502, 503, 504)


def _status_error(status: int, reason: str, name: str) -> StorageError:
    """The typed error for an HTTP status the request did not accept: with `_transport_error`,
    the one place HTTP failures are mapped."""
    if status == 404:
        return NotFound(f"not found: {name} (HTTP 404)")
    if status in (401, 403):
        return AccessDenied(f"access denied to {name} (HTTP {status})")
    return StorageError(f"{name}: the server answered HTTP {status} {reason}")


def _transport_error(e: BaseException, name: str, timeout: float) -> Exception:
    """What a request that failed in transit raises: `retry.Transient` (worth another
    attempt), or `Unreachable` at once for a certificate no retry can make trusted."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return Unreachable(
            f"TLS failed for {name}: {e.reason or e}; for a private CA give its "
            "bundle with --ca-bundle / ca_bundle"
        )
    if isinstance(e, ssl.SSLError):
        return retry.Transient(f"TLS failed: {e.reason or e}")
    if isinstance(e, TimeoutError):
        return retry.Transient(f"no answer within {timeout:g} s (timed out)")
    return retry.Transient(str(e) or type(e).__name__)


def redact(url: str) -> str:
    """The URL without its query string and user info."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class HTTPSource(retry.RetryingSource):
    """An HTTP(S) resource as a `RangeSource`."""

    peer = "the server"
    transport_errors = _TRANSPORT_ERRORS

    def __init__(self, url: str, options: StreamOptions):
        self.name = redact(url)
        self.timeout = options.timeout
        self._context: ssl.SSLContext | None = None
        if url.lower().startswith("https://"):
            try:
                self._context = ssl.create_default_context(cafile=options.ca_bundle)
            except (OSError, ssl.SSLError) as e:
                raise StorageError(f"cannot use the CA bundle {options.ca_bundle}: {e}") from None
        self._local = threading.local()
        self.url = url
        self.policy = options.retry
        response = self._request(headers={"Range": "bytes=0-0"}, accept=(200, 206, 416))
        try:
            if response.status == 416:  # RFC 9110: no byte 0, so an empty file ("*/0")
                match = re.fullmatch(r"bytes \*/0", response.getheader("Content-Range", ""))
                if not match:
                    raise StorageError(
                        f"{self.name}: the server refused the range bytes=0-0 (HTTP 416)"
                    )
                self.size, self.supports_ranges = 0, True
                response.read()
            elif response.status == 206:
                self.etag = response.getheader("ETag")
                match = _CONTENT_RANGE.match(response.getheader("Content-Range", ""))
                if not match or match.group(3) == "*":
                    raise StorageError(f"{self.name}: the server gave no usable Content-Range")
                self.size = int(match.group(3))
                self.supports_ranges = True
                response.read()
            else:
                # No byte ranges: the whole file is coming. Take its size and hang up; it
                # is read later as one sequential response.
                length = response.getheader("Content-Length")
                if length is None:
                    raise StorageError(f"{self.name}: the server gave no Content-Length")
                self.size = int(length)
                self.supports_ranges = False
                self._drop(urllib.parse.urlsplit(self.url))
        except StorageError:
            raise
        except _TRANSPORT_ERRORS as e:
            raise Unreachable(f"cannot read {self.name}: {e}") from None
        finally:
            response.close()

    # -- requests --------------------------------------------------------------------------

    def _connection(self, parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
        key = (parts.scheme, parts.netloc)
        cache = getattr(self._local, "connections", None)
        if cache is None:
            cache = self._local.connections = {}
        if key not in cache:
            if parts.scheme == "https":
                context = self._context or ssl.create_default_context()
                cache[key] = http.client.HTTPSConnection(
                    parts.hostname or "", parts.port, timeout=self.timeout, context=context
                )
            else:
                cache[key] = http.client.HTTPConnection(
                    parts.hostname or "", parts.port, timeout=self.timeout
                )
        return cache[key]

    def _drop(self, parts: urllib.parse.SplitResult) -> None:
        cache = getattr(self._local, "connections", {})
        connection = cache.pop((parts.scheme, parts.netloc), None)
        if connection is not None:
            connection.close()

    def _get(
        self, headers: dict[str, str], accept: tuple[int, ...] = (200, 206)
    ) -> http.client.HTTPResponse:
        """GET the URL (following redirects); a response with a status in `accept`."""
        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            connection = self._connection(parts)
            try:
                connection.request(
                    "GET", target, headers={"Accept-Encoding": "identity", **headers}
                )
                response = connection.getresponse()
            except _TRANSPORT_ERRORS as e:
                self._drop(parts)
                raise _transport_error(e, self.name, self.timeout) from None
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                response.read()
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status in accept:
                if response.will_close:
                    # HTTP/1.0 or "Connection: close": the next request needs a new connection.
                    self._local.connections.pop((parts.scheme, parts.netloc), None)
                return response
            response.read()
            response.close()
            self._drop(parts)
            if response.status in _TRANSIENT_STATUSES:
                answer = f"{response.status} {response.reason}".strip()
                raise retry.Transient(
                    f"HTTP {answer}", answer if response.status in (429, 503) else None
                )
            raise _status_error(response.status, response.reason, self.name)
        raise StorageError(f"{self.name}: more than {_MAX_REDIRECTS} redirects")

    def _request(
        self, headers: dict[str, str], accept: tuple[int, ...] = (200, 206)
    ) -> http.client.HTTPResponse:
        """`_get`, tried as the retry policy says."""
        return retry.request(
            lambda: self._get(headers, accept),
            policy=self.policy,
            name=self.name,
            peer=self.peer,
            after_failure=self._after_failure,
        )

    # -- RangeSource -----------------------------------------------------------------------

    def _after_failure(self) -> None:
        self._drop(urllib.parse.urlsplit(self.url))

    def _open_range(self, start: int, stop: int, log: retry.Attempts) -> retry.Body:
        response = self._get(headers={"Range": f"bytes={start}-{stop - 1}"})
        if response.status != 206:
            response.close()
            raise retry.Transient("the server stopped serving byte ranges")
        try:
            self._check_same(response.getheader("Content-Range"), response.getheader("ETag"))
        except StorageError:
            response.close()
            raise
        return _body(response)

    def open_sequential(self, start: int) -> retry.Body:
        response = self._request(headers={})
        # The response holds its connection until closed: keep it out of the shared cache.
        getattr(self._local, "connections", {}).pop(
            (urllib.parse.urlsplit(self.url).scheme, urllib.parse.urlsplit(self.url).netloc), None
        )
        body = _body(response)
        while body.received < start:  # forward to `start`, in bounded pieces
            if not body.read(min(start - body.received, 1 << 20)):
                break
        return body


def _body(response: http.client.HTTPResponse) -> retry.Body:
    """A response read as one stream; a stall (no data for the timeout) is reported as
    `TransferStalled` with the bytes received so far."""
    return retry.Body(response.readinto, response.close, piece=_PIECE, stall_errors=(TimeoutError,))


class HTTPBackend(Backend):
    """``http://`` and ``https://`` URLs: read-only, no listing."""

    def redact(self, uri: str) -> str:
        return redact(uri)

    def range_source(self, uri: str, options: StreamOptions) -> HTTPSource:
        return HTTPSource(uri, options)

    def read_bytes(self, uri: str, options: StreamOptions, limit: int | None) -> bytes:
        src = HTTPSource(uri, options)
        if limit is not None and src.size > limit:
            raise StorageError(f"{src.name} is {src.size} bytes, larger than the {limit} expected")
        if src.supports_ranges:
            return src.read_range(0, src.size) if src.size else b""
        response = src.open_sequential(0)
        try:
            data = response.readall()
        except TransferStalled as e:
            raise Stalled(
                f"reading {src.name}: the server stalled after sending {e.received} "
                f"of {src.size} bytes (no data for {src.timeout:g} s)"
            ) from None
        finally:
            response.close()
        if len(data) != src.size:
            raise Unreachable(
                f"{src.name}: the connection ended after {len(data)} of {src.size} bytes"
            )
        return data
