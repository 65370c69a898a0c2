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

import os
import tempfile
from collections.abc import Callable
from typing import Any

from ..core.errors import (
    ConfigError,
    NotFound,
    StorageError,
    Throttled,
)
from ..core.settings import parse_bool
from . import retry, s3_settings
from .base import Backend
from .options import StreamOptions
from .s3_client import (  # _clients: the client cache, cleared by tests and settings
    ENDPOINT_HINT,
    T,
    _client,
    _clients,  # noqa: F401
    _counting,
    _error,
    _transient,
    parse,
    parse_object,
)
from .s3_upload import send_parts, upload

__all__ = ["parse", "S3Source", "S3Backend", "upload"]

# Bytes per read from a body: botocore assembles a large read from many small pieces (a
# 1 MiB cap measured 1.8x faster than 100 MiB reads against a loopback server).
_BODY_READ = 1 << 20


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

    def list_names(self, uri: str, options: StreamOptions, recursive: bool = False) -> list[str]:
        """Names of the objects directly under the prefix ``uri/`` (with `recursive`, the
        deeper ones too, as "/"-separated relative paths)."""
        bucket, prefix = parse(uri.rstrip("/") + "/")
        client, resolved = _client(options)
        names: list[str] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            deeper = {} if recursive else {"Delimiter": "/"}
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **deeper):
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

    def publish_object(
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
