"""HTTP(S) URLs, read-only, through urllib3 (the client botocore brings).

Works with HTTP/1.0 and HTTP/1.1 servers. Byte ranges are used when the server offers them
(parallel read-ahead, each range streamed by urllib3 straight into its buffer); otherwise
the file is read as one sequential response. Proxies as curl and requests honour them:
``HTTP_PROXY`` for ``http://`` URLs, ``HTTPS_PROXY`` for ``https://`` ones (a CONNECT
tunnel: TLS stays end to end), hosts in ``NO_PROXY`` reached directly (the standard
library's reading of those variables, lower case too). TLS trusts ``ca_bundle`` /
``--ca-bundle``, else ``AWS_CA_BUNDLE``, ``REQUESTS_CA_BUNDLE``, ``SSL_CERT_FILE``, else the
system store (`settings.ca_bundle`; the same order as S3's). Query strings (where signed
URLs keep their signatures) and proxy credentials never appear in messages.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import urllib.parse
import urllib.request
from typing import Any

from ..core.errors import AccessDenied, NotFound, Stalled, StorageError, TooLarge, Unreachable
from ..core.redaction import redact_uri
from ..core.settings import ca_bundle
from . import retry
from .base import Backend
from .options import StreamOptions
from .retry import TransferStalled

__all__ = ["redact", "HTTPSource", "HTTPBackend", "proxy_for", "send_get"]

# Bytes per read from a response: what arrived before a stall is counted to within this.
_PIECE = 256 * 1024
_MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# Answers worth another attempt (retry.py's policy); 429 and 503 mean "slow down".
_TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
_pools: dict[tuple[str | None, str | None, int], Any] = {}
_pools_lock = threading.Lock()


def _status_error(status: int, reason: str, name: str) -> StorageError:
    """The typed error for an HTTP status the request did not accept: with `_transport_error`,
    the one place HTTP failures are mapped."""
    if status == 404:
        return NotFound(f"not found: {name} (HTTP 404)")
    if status in (401, 403):
        return AccessDenied(f"access denied to {name} (HTTP {status})")
    if status == 407:
        return AccessDenied(f"the proxy refused the request for {name} (HTTP 407)")
    return StorageError(f"{name}: the server answered HTTP {status} {reason}")


def _transport_error(e: BaseException, name: str, timeout: float) -> Exception:
    """What a request that failed in transit raises: `retry.Transient` (worth another
    attempt), or `Unreachable` at once for a certificate no retry can make trusted."""
    import urllib3.exceptions as u3

    reason = getattr(e, "reason", None)
    cause = reason if isinstance(reason, BaseException) else e
    if isinstance(cause, ssl.SSLCertVerificationError) or (
        isinstance(e, u3.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(e)
    ):
        return Unreachable(
            f"TLS failed for {name}: {getattr(cause, 'reason', None) or cause}; for a private "
            "CA give its bundle with --ca-bundle / ca_bundle (or AWS_CA_BUNDLE, "
            "REQUESTS_CA_BUNDLE, SSL_CERT_FILE)"
        )
    if isinstance(e, (u3.SSLError, ssl.SSLError)):
        return retry.Transient(f"TLS failed: {cause}")
    if isinstance(e, u3.NewConnectionError) or isinstance(cause, u3.NewConnectionError):
        # before TimeoutError: urllib3 2 makes NewConnectionError a ConnectTimeoutError,
        # so a refused connection read "no answer within 30 s (timed out)"
        text = str(cause).rpartition("Failed to establish a new connection: ")[2]
        return retry.Transient(f"cannot connect ({text}); is the server up at that host and port?")
    if isinstance(e, (u3.TimeoutError, TimeoutError)):
        return retry.Transient(f"no answer within {timeout:g} s (timed out)")
    if isinstance(e, u3.ProxyError):
        return retry.Transient(f"the proxy failed: {cause}")
    return retry.Transient(str(cause) or type(cause).__name__)


redact = redact_uri  # the URL without its query string and user info


def proxy_for(url: str) -> str | None:
    """The proxy URL for `url` from ``HTTP_PROXY`` / ``HTTPS_PROXY`` (any case), or None
    (none set, or the host, or host:port, is in ``NO_PROXY``), as the standard library and
    botocore read them."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme)
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    # host:port, as botocore passes it: a NO_PROXY entry may name the host or host:port
    host = parts.netloc.rpartition("@")[2]
    if not proxy or bypass(host, proxies):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _pool(url: str, cafile: str | None, workers: int) -> Any:
    """The urllib3 pool manager for `url` (direct or through its proxy), shared per proxy
    and CA bundle (thread-safe)."""
    import urllib3

    proxy = proxy_for(url)
    key = (proxy, cafile, workers)
    with _pools_lock:
        if key not in _pools:
            kwargs: dict[str, Any] = {"maxsize": max(10, workers * 2), "retries": False}
            if cafile:
                kwargs["ca_certs"] = cafile
            _pools[key] = (
                urllib3.ProxyManager(proxy, **kwargs) if proxy else urllib3.PoolManager(**kwargs)
            )
        return _pools[key]


def send_get(
    url: str, headers: dict[str, str], *, cafile: str | None, workers: int, timeout: Any, name: str
) -> Any:
    """One GET of `url` (no redirects followed, no retries) through the pool for its proxy
    and CA bundle: the streaming response, whatever its status (urllib3's, its body not
    read). `timeout` is a ``urllib3.Timeout``; `name` names the resource in messages.

    Raises:
        retry.Transient: no connection, a timeout, a dropped connection (tried again).
        Unreachable: TLS verification failed (the CA bundle is named).
    """
    import urllib3

    try:
        return _pool(url, cafile, workers).request(
            "GET",
            url,
            headers={"Accept-Encoding": "identity", **headers},
            preload_content=False,
            decode_content=False,
            redirect=False,
            retries=False,
            timeout=timeout,
        )
    except (OSError, urllib3.exceptions.HTTPError) as e:
        raise _transport_error(e, name, timeout.read_timeout) from None


class HTTPSource(retry.RetryingSource):
    """An HTTP(S) resource as a `RangeSource`."""

    peer = "the server"

    def __init__(self, url: str, options: StreamOptions):
        import urllib3

        self.name = redact(url)
        self.timeout = options.timeout
        self.transport_errors = (OSError, urllib3.exceptions.HTTPError)
        self._cafile, self._ca_source = ca_bundle(options.ca_bundle)
        if self._cafile and url.lower().startswith("https://"):
            try:
                ssl.create_default_context(cafile=self._cafile)
            except (OSError, ssl.SSLError) as e:
                raise StorageError(
                    f"cannot use the CA bundle {self._cafile} ({self._ca_source}): {e}"
                ) from None
        self._workers = options.workers
        self._timeout = urllib3.Timeout(connect=min(self.timeout, 10.0), read=self.timeout)
        self.url = url
        self.policy = options.retry
        response = self._request(headers={"Range": "bytes=0-0"}, accept=(200, 206, 416))
        try:
            self._probe(response)
        except StorageError:
            raise
        except (OSError, urllib3.exceptions.HTTPError) as e:
            raise Unreachable(f"cannot read {self.name}: {e}") from None
        finally:
            response.release_conn()

    def _probe(self, response: Any) -> None:
        """Size and range support from the answer to ``Range: bytes=0-0``."""
        if response.status == 416:  # RFC 9110: no byte 0, so an empty file ("*/0")
            if not re.fullmatch(r"bytes \*/0", response.headers.get("Content-Range", "")):
                raise StorageError(
                    f"{self.name}: the server refused the range bytes=0-0 (HTTP 416)"
                )
            self.size, self.supports_ranges = 0, True
            response.read()
        elif response.status == 206:
            self.etag = response.headers.get("ETag")
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or match.group(3) == "*":
                raise StorageError(f"{self.name}: the server gave no usable Content-Range")
            self.size = int(match.group(3))
            self.supports_ranges = True
            response.read()
        else:
            # No byte ranges: the whole file is coming. Take its size and hang up; it is
            # read later as one sequential response.
            length = response.headers.get("Content-Length")
            if length is None:
                raise StorageError(f"{self.name}: the server gave no Content-Length")
            self.size = int(length)
            self.supports_ranges = False
            response.close()

    # -- requests --------------------------------------------------------------------------

    def _get(self, headers: dict[str, str], accept: tuple[int, ...] = (200, 206)) -> Any:
        """GET the URL (following redirects); a streaming response with a status in
        `accept`."""

        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            response = send_get(
                url,
                headers,
                cafile=self._cafile,
                workers=self._workers,
                timeout=self._timeout,
                name=self.name,
            )
            location = response.headers.get("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                response.drain_conn()
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status in accept:
                return response
            response.drain_conn()
            response.release_conn()
            if response.status in _TRANSIENT_STATUSES:
                answer = f"{response.status} {response.reason or ''}".strip()
                raise retry.Transient(
                    f"HTTP {answer}", answer if response.status in (429, 503) else None
                )
            raise _status_error(response.status, response.reason or "", self.name)
        raise StorageError(f"{self.name}: more than {_MAX_REDIRECTS} redirects")

    def _request(self, headers: dict[str, str], accept: tuple[int, ...] = (200, 206)) -> Any:
        """`_get`, tried as the retry policy says."""
        return retry.request(
            lambda: self._get(headers, accept), policy=self.policy, name=self.name, peer=self.peer
        )

    # -- RangeSource -----------------------------------------------------------------------

    @property
    def connection(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        return f"the connection to {parts.scheme}://{parts.netloc.rpartition('@')[2]}"

    def _open_range(self, start: int, stop: int, log: retry.Attempts) -> retry.Body:
        response = self._get(headers={"Range": f"bytes={start}-{stop - 1}"})
        if response.status != 206:
            response.close()
            raise retry.Transient("the server stopped serving byte ranges")
        try:
            self._check_same(response.headers.get("Content-Range"), response.headers.get("ETag"))
        except StorageError:
            response.close()
            raise
        return _body(response)

    def open_sequential(self, start: int) -> retry.Body:
        body = _body(self._request(headers={}))
        while body.received < start:  # forward to `start`, in bounded pieces
            if not body.read(min(start - body.received, 1 << 20)):
                break
        return body


def _body(response: Any) -> retry.Body:
    """A response read as one stream, straight into the caller's buffer (urllib3's
    readinto); a stall (no data for the timeout) is reported as `TransferStalled`."""
    import urllib3.exceptions

    def close() -> None:
        response.close()
        response.release_conn()

    def readinto(view: memoryview) -> int:
        try:
            return int(response.readinto(view))
        except urllib3.exceptions.ProtocolError as e:
            ended = (urllib3.exceptions.IncompleteRead, http.client.IncompleteRead)
            if any(isinstance(a, ended) for a in e.args):
                return 0  # the body ended early: the caller counts what arrived
            raise

    return retry.Body(
        readinto,
        close,
        piece=_PIECE,
        stall_errors=(urllib3.exceptions.ReadTimeoutError, TimeoutError),
    )


class HTTPBackend(Backend):
    """``http://`` and ``https://`` URLs: read-only, no listing."""

    def range_source(self, uri: str, options: StreamOptions) -> HTTPSource:
        return HTTPSource(uri, options)

    def read_bytes(self, uri: str, options: StreamOptions, limit: int | None) -> bytes:
        src = HTTPSource(uri, options)
        if limit is not None and src.size > limit:
            raise TooLarge(f"{src.name} is {src.size} bytes, larger than the {limit} expected")
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
