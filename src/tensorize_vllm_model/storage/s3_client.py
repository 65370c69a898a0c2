"""S3's client per options (boto3, from `s3_settings`), its URIs, and the one place its
errors are mapped to this package's typed errors; botocore's retries counted in the
`retry.Attempts` log of the request under way (see `s3` for the retry design)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

from ..core.errors import (
    AccessDenied,
    AlreadyExists,
    NotFound,
    StorageError,
    Unreachable,
)
from ..core.settings import ca_bundle
from . import retry, s3_settings
from .base import split_object, split_uri
from .options import StreamOptions

_clients: dict[StreamOptions, tuple] = {}
_clients_lock = threading.Lock()
# The `retry.Attempts` log of the request or range this thread is making (see _counting).
_current = threading.local()
# S3's "slow down" answers (botocore's standard mode retries them as throttling).
_THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
)
T = TypeVar("T")


def parse(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key) (`base.split_uri`)."""
    return split_uri(uri)


def parse_object(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key), for an operation on one object.

    Raises:
        ConfigError: no bucket, or no key (a bucket alone, or a prefix ending in ``/``).
    """
    return split_object(uri, example="s3://bucket/path/model.tensors")


def _client(options: StreamOptions):
    """A boto3 client for `options` and its `S3Settings` (cached: clients are thread-safe
    and costly to make)."""
    with _clients_lock:
        if options in _clients:
            return _clients[options]
        import boto3
        from botocore.config import Config

        settings = s3_settings.resolve(options)
        config = Config(
            signature_version=settings.signature_version,
            connect_timeout=min(options.timeout, 10.0),
            read_timeout=options.timeout,
            retries=options.retry.botocore_retries(),
            max_pool_connections=max(10, options.workers * 2),
            s3={"addressing_style": settings.addressing_style},
        )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint,
            region_name=options.get("s3_region_name"),
            config=config,
            # None: botocore's own (the AWS config profile's ca_bundle, else certifi's)
            verify=ca_bundle(options.ca_bundle)[0],
            **settings.client_kwargs,
        )
        # First, so that its False (the budget is spent) stops botocore's standard handler.
        client.meta.events.register_first("needs-retry.s3", _on_attempt)
        _clients[options] = (client, settings)
        return _clients[options]


@contextlib.contextmanager
def _counting(log: retry.Attempts) -> Iterator[None]:
    """Record the requests this thread makes meanwhile (botocore's retries included) in
    `log`, and let botocore retry them only while `log` has attempts left."""
    _current.log = log
    try:
        yield
    finally:
        _current.log = None


def _on_attempt(
    response: Any = None, caught_exception: BaseException | None = None, **_: Any
) -> bool | None:
    """botocore's ``needs-retry`` event, after every request it sends: record a failed one
    in the thread's `retry.Attempts` log; False (no retry) once the log's budget is spent,
    else None (botocore's standard mode decides, and waits as it says)."""
    log = getattr(_current, "log", None)
    if log is None:
        return None
    if caught_exception is not None:
        log.failed(f"{type(caught_exception).__name__}: {caught_exception}")
    else:
        http, parsed = response
        if http.status_code < 300:
            return None
        code = str((parsed or {}).get("Error", {}).get("Code", "") or "")
        answer = _answer(http.status_code, code)
        slow_down = http.status_code in (429, 503) or code in _THROTTLING_CODES
        log.failed(answer, answer if slow_down else None)
    return False if log.left <= 0 else None


def _answer(status: int, code: str) -> str:
    """An S3 error answer for messages: ``HTTP 503 SlowDown``; ``HTTP 503`` where it had
    no body (a HEAD)."""
    return f"HTTP {status}" + ("" if code in ("", str(status)) else f" {code}")


def _transient(e: BaseException) -> bool:
    """Whether botocore's standard mode retries this failure (a connection failure, a
    timeout, a 5xx or 429 answer, throttling, ``RequestTimeout``)."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(e.response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in _THROTTLING_CODES | {"RequestTimeout"}
    return isinstance(e, (ConnectionError, HTTPClientError))


def _error(
    e: BaseException, uri: str, resolved: s3_settings.S3Settings, action: str
) -> StorageError:
    """The typed error for a boto3/botocore failure, saying what failed, for which object,
    and what to check: the one place S3 failures are mapped."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        ReadTimeoutError,
    )

    where = resolved.endpoint or "AWS S3"
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "PreconditionFailed" or status == 412:
            return AlreadyExists(f"{uri} already exists; it was left as it is (not replaced)")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return AccessDenied(
                f"access denied {action} {uri} (HTTP 403{'' if code in ('', '403') else ' ' + code})"
                f" at {where}; credentials: "
                f"{resolved.credentials}. Check the S3 access key and secret"
            )
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
            if code == "NoSuchBucket":
                return NotFound(f"no such bucket: {parse(uri)[0]} (for {uri})")
            return NotFound(f"no such object: {uri} (at {where})")
        if status in (429, 503) or code in _THROTTLING_CODES:
            tries = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
            return retry.throttled(
                f"{action} {uri}", f"the S3 endpoint {where}", _answer(status, code), tries
            )
        return StorageError(f"S3 refused {action} {uri} at {where}: HTTP {status} {code}")
    if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
        return Unreachable(
            f"cannot reach the S3 endpoint {where} {action} {uri}: {e}; {ENDPOINT_HINT}"
        )
    if isinstance(e, ReadTimeoutError):
        return Unreachable(f"the S3 endpoint {where} timed out {action} {uri}")
    kind = Unreachable if isinstance(e, HTTPClientError) else StorageError
    return kind(f"S3 error {action} {uri} at {where}: {type(e).__name__}: {e}")


# What an unreachable endpoint's error asks the user to check.
ENDPOINT_HINT = (
    "is it up? The endpoint is --s3-endpoint (s3_endpoint in the config), else S3_ENDPOINT_URL"
)
