"""HTTP(S) URLs, read-only, through the standard library's ``http.client``.

Works with HTTP/1.0 and HTTP/1.1 servers. Byte ranges are used when the server offers them
(parallel read-ahead); otherwise the file is read as one sequential response. HTTPS uses the
system's trust store, or the CA bundle given (``ca_bundle``). Query strings (where signed URLs
keep their signatures) never appear in messages.
"""

from __future__ import annotations

import http.client
import io
import re
import ssl
import threading
import time
import urllib.parse

from ..errors import StorageError
from .options import StreamOptions
from .ranged import TransferStalled

__all__ = ["redact", "HTTPSource", "source", "read_bytes", "exists"]

_ATTEMPTS = 3
# Bytes per read from a response: what arrived before a stall is counted to within this.
_PIECE = 256 * 1024
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _TransportError(StorageError):
    """The request failed in transit (no connection, no answer): worth another attempt."""


def redact(url: str) -> str:
    """The URL without its query string and user info."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class HTTPSource:
    """An HTTP(S) resource as a `RangeSource`."""

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
        response = self._get(headers={"Range": "bytes=0-0"}, accept=(200, 206, 416))
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
        except (OSError, http.client.HTTPException) as e:
            raise StorageError(f"cannot read {self.name}: {e}") from None
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
                    parts.hostname, parts.port, timeout=self.timeout, context=context
                )
            else:
                cache[key] = http.client.HTTPConnection(
                    parts.hostname, parts.port, timeout=self.timeout
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
            except ssl.SSLError as e:
                self._drop(parts)
                raise StorageError(
                    f"TLS failed for {self.name}: {e.reason or e}; for a private CA give its "
                    "bundle with --ca-bundle / ca_bundle"
                ) from None
            except TimeoutError:
                self._drop(parts)
                raise _TransportError(
                    f"{self.name}: no answer within {self.timeout:g} s (timed out)"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                self._drop(parts)
                raise _TransportError(f"cannot reach {self.name}: {e}") from None
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
            if response.status == 404:
                raise StorageError(f"not found: {self.name} (HTTP 404)")
            if response.status in (401, 403):
                raise StorageError(f"access denied to {self.name} (HTTP {response.status})")
            raise StorageError(
                f"{self.name}: the server answered HTTP {response.status} {response.reason}"
            )
        raise StorageError(f"{self.name}: more than {_MAX_REDIRECTS} redirects")

    # -- RangeSource -----------------------------------------------------------------------

    def read_range(self, start: int, stop: int) -> bytes:
        data = bytearray(stop - start)
        self.read_range_into(start, memoryview(data))
        return bytes(data)

    def read_range_into(self, start: int, view: memoryview) -> None:
        stop = start + len(view)
        tried: list[str] = []  # what each attempt ran into
        for attempt in range(_ATTEMPTS):
            try:
                response = self._get(headers={"Range": f"bytes={start}-{stop - 1}"})
                try:
                    if response.status != 206:
                        raise StorageError(f"{self.name}: the server stopped serving byte ranges")
                    got = _fill(response, view)
                finally:
                    response.close()
                if got == len(view):
                    return
                tried.append(f"the response ended after {got} of {len(view)} bytes")
            except TransferStalled as e:
                tried.append(
                    f"the server stalled after sending {e.received} of {len(view)} "
                    f"bytes (no data for {self.timeout:g} s)"
                )
            except (_TransportError, OSError, http.client.HTTPException) as e:
                tried.append(str(e) or type(e).__name__)
            self._drop(urllib.parse.urlsplit(self.url))
            time.sleep(0.2 * (attempt + 1))
        raise StorageError(
            f"reading {self.name} failed at bytes {start}-{stop - 1} after {_ATTEMPTS} attempts "
            f"(the connection dropped or timed out): {'; '.join(tried)}"
        )

    def open_sequential(self, start: int):
        response = self._get(headers={})
        # The response holds its connection until closed: keep it out of the shared cache.
        getattr(self._local, "connections", {}).pop(
            (urllib.parse.urlsplit(self.url).scheme, urllib.parse.urlsplit(self.url).netloc), None
        )
        body = _Body(response, 0)
        while body.received < start:  # forward to `start`, in bounded pieces
            if not body.read(min(start - body.received, 1 << 20)):
                break
        return body


class _Body(io.RawIOBase):
    """A response read as one stream: a stall (no data for the timeout) is reported as
    `TransferStalled` with the bytes received so far."""

    def __init__(self, response: http.client.HTTPResponse, received: int):
        super().__init__()
        self._response = response
        self.received = received

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            count = self._response.readinto(memoryview(buffer).cast("B")[:_PIECE])
        except TimeoutError:
            raise TransferStalled(self.received) from None
        self.received += count
        return count

    def close(self) -> None:
        self._response.close()
        super().close()


def _fill(response: http.client.HTTPResponse, view: memoryview) -> int:
    """Read `response` into `view` until it is full or the response ends; the count."""
    got = 0
    while got < len(view):
        try:
            count = response.readinto(view[got : got + _PIECE])
        except TimeoutError:
            raise TransferStalled(got) from None
        if not count:
            break
        got += count
    return got


def source(url: str, options: StreamOptions) -> HTTPSource:
    return HTTPSource(url, options)


def read_bytes(url: str, options: StreamOptions, limit: int | None = None) -> bytes:
    src = HTTPSource(url, options)
    if limit is not None and src.size > limit:
        raise StorageError(f"{src.name} is {src.size} bytes, larger than the {limit} expected")
    if src.supports_ranges:
        return src.read_range(0, src.size) if src.size else b""
    response = src.open_sequential(0)
    try:
        data = response.readall()
    except TransferStalled as e:
        raise StorageError(
            f"reading {src.name}: the server stalled after sending {e.received} "
            f"of {src.size} bytes (no data for {src.timeout:g} s)"
        ) from None
    finally:
        response.close()
    if len(data) != src.size:
        raise StorageError(
            f"{src.name}: the connection ended after {len(data)} of {src.size} bytes"
        )
    return data


def exists(url: str, options: StreamOptions) -> bool:
    try:
        HTTPSource(url, options)
    except StorageError as e:
        if "HTTP 404" in str(e):
            return False
        raise
    return True
