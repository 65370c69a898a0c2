"""S3 (and S3-compatible stores) through boto3: ranged reads, listings, multipart uploads.

Credentials, endpoint, addressing style and TLS come from `s3_settings` (the options, the
environment, ``~/.s3cfg`` and the AWS config files; see docs/s3.md).

An upload is published only when it completes: a failed multipart upload is aborted, so no
object appears at the key.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ConfigError, StorageError
from . import s3_settings
from .options import StreamOptions
from .ranged import TransferStalled

__all__ = [
    "parse",
    "S3Source",
    "source",
    "read_bytes",
    "exists",
    "list_names",
    "upload",
    "check_bucket",
]

_PART_SIZE = 64 * 1024 * 1024
_MAX_PARTS = 9_000
_READ_ATTEMPTS = 3
_clients: dict[StreamOptions, tuple] = {}
_clients_lock = threading.Lock()


def parse(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"{uri!r} names no bucket")
    return bucket, key


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
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=max(10, options.workers * 2),
            s3={"addressing_style": settings.addressing_style},
        )
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint,
            region_name=options.s3_region_name,
            config=config,
            verify=options.ca_bundle if options.ca_bundle else None,
            **settings.client_kwargs,
        )
        _clients[options] = (client, settings)
        return _clients[options]


def _error(e: Exception, uri: str, resolved: s3_settings.S3Settings, action: str) -> StorageError:
    """A StorageError saying what failed, for which object, and what to check."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    where = resolved.endpoint or "AWS S3"
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(
                f"access denied {action} {uri} (HTTP 403{'' if code in ('', '403') else ' ' + code})"
                f" at {where}; credentials: "
                f"{resolved.credentials}. Check the S3 access key and secret"
            )
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
            what = "no such bucket" if code == "NoSuchBucket" else "no such object"
            return StorageError(f"{what}: {uri} (at {where})")
        return StorageError(f"S3 refused {action} {uri} at {where}: HTTP {status} {code}")
    if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(f"cannot reach the S3 endpoint {where} {action} {uri}: {e}")
    if isinstance(e, ReadTimeoutError):
        return StorageError(f"the S3 endpoint {where} timed out {action} {uri}")
    return StorageError(f"S3 error {action} {uri} at {where}: {type(e).__name__}: {e}")


class S3Source:
    """An S3 object as a `RangeSource`."""

    supports_ranges = True

    def __init__(self, uri: str, options: StreamOptions):
        self.name = uri
        self.timeout = options.timeout
        self.bucket, self.key = parse(uri)
        self._client, self._resolved = _client(options)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 - mapped to a clear StorageError
            raise self._not_found_or(e, "reading") from None
        self.size = int(head["ContentLength"])

    def _not_found_or(self, e: Exception, action: str) -> StorageError:
        error = _error(e, self.name, self._resolved, action)
        if "no such object" in str(error):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except Exception as bucket_error:  # noqa: BLE001
                if "no such" in str(_error(bucket_error, self.name, self._resolved, action)):
                    return StorageError(f"no such bucket: {self.bucket} (for {self.name})")
        return error

    def read_range(self, start: int, stop: int) -> bytes:
        data = bytearray(stop - start)
        self.read_range_into(start, memoryview(data))
        return bytes(data)

    def read_range_into(self, start: int, view: memoryview) -> None:
        stop = start + len(view)
        tried: list[str] = []  # what each attempt ran into
        for attempt in range(_READ_ATTEMPTS):
            try:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{stop - 1}"
                )
                body = _Body(response["Body"])
                try:
                    got = _fill(body, view)
                finally:
                    body.close()
                if got == len(view):
                    return
                tried.append(f"the response ended after {got} of {len(view)} bytes")
            except TransferStalled as e:
                tried.append(
                    f"the endpoint stalled after sending {e.received} of {len(view)} "
                    f"bytes (no data for {self.timeout:g} s)"
                )
            except Exception as e:  # noqa: BLE001 - retried, then reported
                from botocore.exceptions import ClientError

                if isinstance(e, ClientError):
                    raise _error(e, self.name, self._resolved, "reading") from None
                tried.append(str(e) or type(e).__name__)
            time.sleep(0.2 * (attempt + 1))
        raise StorageError(
            f"reading {self.name} failed at bytes {start}-{stop - 1} after {_READ_ATTEMPTS} "
            f"attempts (the connection to {self._resolved.endpoint or 'AWS S3'} dropped or "
            f"timed out): {'; '.join(tried)}"
        )

    def open_sequential(self, start: int) -> io.RawIOBase:
        """One GET from `start` to the end (``stream_kwargs={"ranges": false}``)."""
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-"
            )
        except Exception as e:  # noqa: BLE001
            raise _error(e, self.name, self._resolved, "reading") from None
        return _Body(response["Body"])


_BODY_READ = 1 << 20


class _Body(io.RawIOBase):
    """A botocore response body as a raw stream; a stall (no data for the read timeout) is
    reported as `TransferStalled` with the bytes received so far."""

    def __init__(self, body: Any):
        super().__init__()
        self._body = body
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import ReadTimeoutError

        # Bounded reads: botocore assembles a large read from many small pieces (a 1 MiB
        # cap measured 1.8x faster than 100 MiB reads against a loopback server).
        view = memoryview(buffer).cast("B")[:_BODY_READ]
        try:
            if hasattr(self._body, "readinto"):
                count = self._body.readinto(view)
            else:  # botocore before StreamingBody.readinto
                data = self._body.read(len(view))
                count = len(data)
                view[:count] = data
        except ReadTimeoutError:
            raise TransferStalled(self.received) from None
        self.received += count
        return count

    def close(self) -> None:
        self._body.close()
        super().close()


def _fill(body: _Body, view: memoryview) -> int:
    """Read `body` into `view` until it is full or the body ends; the count."""
    got = 0
    while got < len(view):
        count = body.readinto(view[got:])
        if not count:
            break
        got += count
    return got


def source(uri: str, options: StreamOptions) -> S3Source:
    return S3Source(uri, options)


def read_bytes(uri: str, options: StreamOptions, limit: int | None = None) -> bytes:
    src = S3Source(uri, options)
    if limit is not None and src.size > limit:
        raise StorageError(f"{uri} is {src.size} bytes, larger than the {limit} expected")
    return src.read_range(0, src.size) if src.size else b""


def exists(uri: str, options: StreamOptions) -> bool:
    try:
        S3Source(uri, options)
    except StorageError as e:
        if "no such" in str(e):
            return False
        raise
    return True


def list_names(uri: str, options: StreamOptions) -> list[str]:
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


def check_bucket(uri: str, options: StreamOptions) -> None:
    """Raise a clear StorageError unless the bucket of `uri` exists and accepts our
    credentials."""
    bucket, _ = parse(uri)
    client, resolved = _client(options)
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001
        error = _error(e, uri, resolved, "writing")
        if "no such" in str(error):
            raise StorageError(f"no such bucket: {bucket} (for {uri})") from None
        raise error from None


def upload(path: str, uri: str, options: StreamOptions, *, replace: bool = True) -> None:
    """Upload a local file to `uri`; the object appears only when the upload completes.

    With ``replace=False`` the write is conditional (``If-None-Match: *``, S3's conditional
    writes): an object already at `uri` is left as it is and `StorageError` names it. A
    server that ignores the condition is caught by a check just before the upload.
    """
    bucket, key = parse(uri)
    client, resolved = _client(options)
    size = os.path.getsize(path)
    condition = {} if replace else {"IfNoneMatch": "*"}
    if not replace and exists(uri, options):
        raise _exists_error(uri)
    try:
        if size <= _PART_SIZE:
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f.read(), **condition)
            return
        part_size = max(_PART_SIZE, math.ceil(size / _MAX_PARTS))
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    except Exception as e:  # noqa: BLE001
        if _precondition_failed(e):
            raise _exists_error(uri) from None
        raise _error(e, uri, resolved, "writing") from None
    try:

        def send(number: int) -> dict:
            with open(path, "rb") as f:
                f.seek((number - 1) * part_size)
                body = f.read(part_size)
            etag = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )["ETag"]
            return {"PartNumber": number, "ETag": etag}

        count = math.ceil(size / part_size)
        with ThreadPoolExecutor(max(1, min(options.workers, count))) as pool:
            parts = list(pool.map(send, range(1, count + 1)))
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            **condition,
        )
    except BaseException as e:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            leftover = ""
        except Exception:  # noqa: BLE001 - the upload's own error is the one to report
            leftover = (
                f"; aborting the incomplete multipart upload {upload_id} failed too: no object "
                "was created, but its parts hold storage until it is aborted (e.g. by a "
                "bucket lifecycle rule)"
            )
        if _precondition_failed(e):
            raise _exists_error(uri) from None
        if isinstance(e, Exception):
            raise StorageError(f"{_error(e, uri, resolved, 'writing')}{leftover}") from None
        raise


def _precondition_failed(e: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(e, ClientError) and (
        e.response.get("Error", {}).get("Code") == "PreconditionFailed"
        or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
    )


def _exists_error(uri: str) -> StorageError:
    return StorageError(f"{uri} already exists; it was left as it is (not replaced)")


def keep_aside(uri: str, backup: str, options: StreamOptions) -> None:
    """Copy the object at `uri` to `backup` (server-side), to restore it if a publish fails."""
    bucket, key = parse(uri)
    _, backup_key = parse(backup)
    client, resolved = _client(options)
    try:
        client.copy_object(Bucket=bucket, Key=backup_key, CopySource={"Bucket": bucket, "Key": key})
    except Exception as e:  # noqa: BLE001
        raise _error(e, uri, resolved, "keeping a copy of") from None


def restore(backup: str, uri: str, options: StreamOptions) -> None:
    keep_aside(backup, uri, options)
    delete(backup, options)


def delete(uri: str, options: StreamOptions) -> None:
    bucket, key = parse(uri)
    client, resolved = _client(options)
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001
        raise _error(e, uri, resolved, "deleting") from None
