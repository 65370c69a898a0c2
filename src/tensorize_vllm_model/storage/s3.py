"""S3 (and S3-compatible stores) through boto3: ranged reads, listings, multipart uploads.

Credentials, endpoint, addressing style and TLS come from `s3_settings` (the options, the
environment, ``~/.s3cfg`` and the AWS config files; see docs/s3.md).

An upload is published only when it completes: a failed multipart upload is aborted, so no
object appears at the key.

Retries (the one policy of storage/retry.py, `StreamOptions.retry`): every S3 request is
retried by botocore's standard mode, configured from the policy; a range's body that
drops, ends early or stalls is retried by `retry.read_range_into`. A hook on botocore's
``needs-retry`` event records each request's attempts in the `retry.Attempts` log of the
probe or byte range under way, so that both layers share one budget and the errors list
every attempt.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    NotFound,
    StorageError,
    Throttled,
    Unreachable,
)
from ..settings import ca_bundle, parse_bool
from . import retry, s3_settings
from .base import Backend, split_object, split_uri
from .options import StreamOptions

__all__ = ["parse", "S3Source", "S3Backend", "upload"]

_PART_SIZE = 64 * 1024 * 1024
_MAX_PARTS = 9_000
# Bytes per read from a body: botocore assembles a large read from many small pieces (a
# 1 MiB cap measured 1.8x faster than 100 MiB reads against a loopback server).
_BODY_READ = 1 << 20
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


class S3Source(retry.RetryingSource):
    """An S3 object as a `RangeSource`."""

    supports_ranges = True
    peer = "the endpoint"

    def __init__(self, uri: str, options: StreamOptions):
        # What a body that drops raises (botocore's and urllib3's transport errors, and
        # OSError): retried by retry.py; anything else (a bug) is raised, not retried. A
        # failed request is retried by botocore (`_open_range`).
        self.transport_errors = _transport_errors()
        self.name = uri
        self.timeout = options.timeout
        self.policy = options.retry
        self.bucket, self.key = parse_object(uri)
        self._client, self._resolved = _client(options)
        head = self._request(lambda: self._client.head_object(Bucket=self.bucket, Key=self.key))
        self.size = int(head["ContentLength"])
        self.etag = head.get("ETag")

    def _request(self, send: Callable[[], T]) -> T:
        """One request (botocore retries it as the policy says), its failure mapped."""
        log = retry.Attempts(self.policy)
        try:
            with _counting(log):
                return send()
        except Exception as e:  # noqa: BLE001 - mapped to a typed StorageError
            raise self._failure(e, log) from None

    def _failure(self, e: Exception, log: retry.Attempts) -> StorageError:
        """The typed error of a request botocore gave up on, listing each attempt."""
        error = self._not_found_or(e)
        if not _transient(e) or not log.used or isinstance(error, Throttled):
            return error
        return log.unreachable(
            f"the S3 endpoint {self._resolved.endpoint or 'AWS S3'} reading {self.name}",
            ENDPOINT_HINT,
        )

    def _not_found_or(self, e: Exception) -> StorageError:
        """HEAD answers a bare 404 for a missing bucket too: tell the two apart."""
        error = _error(e, self.name, self._resolved, "reading")
        if isinstance(error, NotFound):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except Exception as bucket_error:  # noqa: BLE001
                if isinstance(_error(bucket_error, self.name, self._resolved, ""), NotFound):
                    return NotFound(f"no such bucket: {self.bucket} (for {self.name})")
        return error

    @property
    def connection(self) -> str:
        return f"the connection to {self._resolved.endpoint or 'AWS S3'}"

    def _open_range(self, start: int, stop: int, log: retry.Attempts) -> retry.Body:
        try:
            with _counting(log):
                response = self._client.get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{stop - 1}"
                )
        except Exception as e:  # noqa: BLE001 - mapped; botocore retried what it could
            error = _error(e, self.name, self._resolved, "reading")
            if _transient(e):
                raise retry.GaveUp(error) from None
            raise error from None
        try:
            self._check_same(response.get("ContentRange"), response.get("ETag"))
        except StorageError:
            response["Body"].close()
            raise
        return _body(response["Body"])

    def open_sequential(self, start: int) -> retry.Body:
        """One GET from `start` to the end (``stream_kwargs={"ranges": false}``)."""
        response = self._request(
            lambda: self._client.get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-"
            )
        )
        return _body(response["Body"])


def _transport_errors() -> tuple[type[BaseException], ...]:
    import http.client

    import urllib3.exceptions
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    return (
        OSError,
        http.client.HTTPException,
        urllib3.exceptions.HTTPError,
        HTTPClientError,  # ResponseStreamingError, ReadTimeoutError, ...
        IncompleteReadError,
    )


def _body(body: Any) -> retry.Body:
    """A botocore response body as a raw stream; a stall (no data for the read timeout) is
    reported as `TransferStalled` with the bytes received so far."""
    from botocore.exceptions import ReadTimeoutError

    def readinto(view: memoryview) -> int:
        if hasattr(body, "readinto"):
            return int(body.readinto(view))
        data = body.read(len(view))  # botocore before StreamingBody.readinto
        view[: len(data)] = data
        return len(data)

    return retry.Body(readinto, body.close, piece=_BODY_READ, stall_errors=(ReadTimeoutError,))


class S3Backend(Backend):
    """``s3://bucket/key`` through boto3: staged in the temporary directory, published by
    an upload that completes (or leaves nothing)."""

    writable = True
    # tensorizer's open_stream keywords (docs/s3.md says what each does).
    option_keys = (
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_endpoint",
        "s3_config_path",
        "s3_region_name",
        "s3_signature_version",
        "addressing_style",
        "force_http",
    )

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        if "force_http" in values:  # "true"/"false" strings too, as older vLLM docs give them
            values["force_http"] = parse_bool(values["force_http"], "stream_kwargs force_http")
        style = values.get("addressing_style")
        if style is not None and style not in s3_settings.ADDRESSING_STYLES:
            raise ConfigError(
                f"stream_kwargs addressing_style must be one of "
                f"{', '.join(s3_settings.ADDRESSING_STYLES)}, got {style!r}"
            )
        return values

    def range_source(self, uri: str, options: StreamOptions) -> S3Source:
        return S3Source(uri, options)

    def list_names(self, uri: str, options: StreamOptions) -> list[str]:
        """Names of the objects directly under the prefix ``uri/`` (no deeper levels)."""
        bucket, prefix = parse(uri.rstrip("/") + "/")
        client, resolved = _client(options)
        names: list[str] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for item in page.get("Contents", []):
                    names.append(item["Key"][len(prefix) :])
        except Exception as e:  # noqa: BLE001
            raise _error(e, uri, resolved, "listing") from None
        return sorted(n for n in names if n)

    def check_writable(self, directory: str, options: StreamOptions) -> None:
        """The endpoint is allowed, the bucket exists and accepts our credentials."""
        bucket, _ = parse(directory)
        client, resolved = _client(options)
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as e:  # noqa: BLE001
            error = _error(e, directory, resolved, "writing")
            if isinstance(error, NotFound):
                raise NotFound(f"no such bucket: {bucket} (for {directory})") from None
            raise error from None

    def stage(self, uri: str, options: StreamOptions) -> str:
        parse_object(uri)  # refuses a URI without a bucket or key now, not at commit
        try:
            fd, temp = tempfile.mkstemp(prefix="tensorize-vllm-model-", suffix=".staged")
            os.close(fd)
        except OSError as e:
            raise StorageError(
                f"cannot create a temporary file for {uri}: {e.strerror or e}"
            ) from e
        return temp

    def send_ahead(self, temp: str, uri: str, options: StreamOptions, *, replace: bool) -> Any:
        return send_parts(temp, uri, options, replace=replace)

    def discard(self, sent: Any, options: StreamOptions) -> None:
        sent.abort()

    def publish(
        self, temp: str, uri: str, options: StreamOptions, *, replace: bool, sent: Any = None
    ) -> None:
        if sent is None:
            upload(temp, uri, options, replace=replace)
        else:
            sent.complete()

    def keep_aside(self, uri: str, backup: str, options: StreamOptions) -> None:
        """Copy the object at `uri` to `backup` (server-side; boto3's managed copy, which
        copies objects over CopyObject's 5 GiB limit in parts)."""
        bucket, key = parse(uri)
        _, backup_key = parse(backup)
        client, resolved = _client(options)
        try:
            client.copy({"Bucket": bucket, "Key": key}, bucket, backup_key)
        except Exception as e:  # noqa: BLE001
            raise _error(e, uri, resolved, "keeping a copy of") from None

    def restore(self, backup: str, uri: str, options: StreamOptions) -> None:
        self.keep_aside(backup, uri, options)
        self.delete(backup, options)

    def delete(self, uri: str, options: StreamOptions) -> None:
        bucket, key = parse(uri)
        client, resolved = _client(options)
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001
            raise _error(e, uri, resolved, "deleting") from None


def _exists_error(uri: str) -> AlreadyExists:
    return AlreadyExists(f"{uri} already exists; it was left as it is (not replaced)")


def upload(path: str, uri: str, options: StreamOptions, *, replace: bool = True) -> None:
    """Upload a local file to `uri`; the object appears only when the upload completes.

    With ``replace=False`` the write is conditional (``If-None-Match: *``, S3's conditional
    writes): an object already at `uri` is left as it is and `AlreadyExists` names it. A
    server that ignores the condition is caught by a check just before the upload.
    """
    sent = send_parts(path, uri, options, replace=replace)
    if sent is not None:
        sent.complete()
        return
    bucket, key = parse(uri)
    client, resolved = _client(options)
    condition = {} if replace else {"IfNoneMatch": "*"}
    if not replace and S3Backend().exists(uri, options):
        raise _exists_error(uri)
    try:
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=key, Body=f.read(), **condition)
    except Exception as e:  # noqa: BLE001
        raise _error(e, uri, resolved, "writing") from None


class MultipartUpload:
    """A multipart upload whose parts are all sent (`send_parts`): no object exists at
    its key until `complete` (S3's CompleteMultipartUpload); `abort` drops the parts."""

    def __init__(
        self, uri: str, options: StreamOptions, upload_id: str, parts: list, replace: bool
    ):
        self.uri, self.options, self.upload_id = uri, options, upload_id
        self.parts, self.replace = parts, replace

    def complete(self) -> None:
        """Make the object appear at the key (conditional with ``replace=False``).

        Raises:
            AlreadyExists: an object appeared at the key meanwhile (``replace=False``).
            StorageError: the store refused or could not be reached (the upload aborted).
        """
        bucket, key = parse(self.uri)
        client, resolved = _client(self.options)
        condition = {} if self.replace else {"IfNoneMatch": "*"}
        with _aborted_on_failure(client, self.uri, resolved, self.upload_id):
            client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
                **condition,
            )

    def abort(self) -> None:
        """Drop the sent parts (AbortMultipartUpload).

        Raises:
            StorageError: the store could not be reached (naming the upload left behind).
        """
        bucket, key = parse(self.uri)
        client, _ = _client(self.options)
        leftover = _abort_upload(client, bucket, key, self.upload_id)
        if leftover:
            raise StorageError(f"{self.uri}: {leftover.lstrip('; ')}")


def send_parts(
    path: str, uri: str, options: StreamOptions, *, replace: bool = True
) -> MultipartUpload | None:
    """Send a local file over `_PART_SIZE` bytes as the parts of a multipart upload to
    `uri`, not completed (`MultipartUpload.complete` publishes it); None for a smaller file
    (one PutObject, sent when published). A failed part aborts the upload.

    Raises:
        AlreadyExists: ``replace=False`` and an object is at `uri` already.
        StorageError: the store refused or could not be reached (named).
    """
    size = os.path.getsize(path)
    if size <= _PART_SIZE:
        return None
    bucket, key = parse(uri)
    client, resolved = _client(options)
    if not replace and S3Backend().exists(uri, options):
        raise _exists_error(uri)
    part_size = max(_PART_SIZE, math.ceil(size / _MAX_PARTS))
    try:
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    except Exception as e:  # noqa: BLE001
        raise _error(e, uri, resolved, "writing") from None
    with _aborted_on_failure(client, uri, resolved, upload_id):
        parts = _send_parts(client, path, (bucket, key, upload_id), size, part_size, options)
    return MultipartUpload(uri, options, upload_id, parts, replace)


def _send_parts(
    client: Any,
    path: str,
    target: tuple[str, str, str],
    size: int,
    part_size: int,
    options: StreamOptions,
) -> list[dict[str, Any]]:
    """Upload `path` as the parts of multipart upload `target` (bucket, key, upload id),
    in parallel; the parts' numbers and ETags."""
    bucket, key, upload_id = target

    def send(number: int) -> dict[str, Any]:
        with open(path, "rb") as f:
            f.seek((number - 1) * part_size)
            body = f.read(part_size)
        etag = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
        )["ETag"]
        return {"PartNumber": number, "ETag": etag}

    count = math.ceil(size / part_size)
    with ThreadPoolExecutor(max(1, min(options.workers, count))) as pool:
        return list(pool.map(send, range(1, count + 1)))


@contextlib.contextmanager
def _aborted_on_failure(client: Any, uri: str, resolved: Any, upload_id: str) -> Iterator[None]:
    """Abort multipart upload `upload_id` to `uri` if the block fails; an Exception is
    raised as a StorageError naming `uri` (and an upload the abort could not drop)."""
    try:
        yield
    except BaseException as e:
        bucket, key = parse(uri)
        leftover = _abort_upload(client, bucket, key, upload_id)
        if isinstance(e, Exception):
            error = _error(e, uri, resolved, "writing")
            raise type(error)(f"{error}{leftover}") from None
        raise


def _abort_upload(client: Any, bucket: str, key: str, upload_id: str) -> str:
    """Abort an incomplete multipart upload; what to add to the error when that fails."""
    try:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        return ""
    except Exception:  # noqa: BLE001 - the upload's own error is the one to report
        return (
            f"; aborting the incomplete multipart upload {upload_id} failed too: no object "
            "was created, but its parts hold storage until it is aborted (e.g. by a "
            "bucket lifecycle rule)"
        )
