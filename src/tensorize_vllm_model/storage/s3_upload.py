"""S3 uploads that publish only when they complete: one PutObject, or the parts of a
multipart upload sent ahead (`send_parts`) and completed (`MultipartUpload.complete`), or
aborted so that no object appears at the key."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..core.errors import (
    AlreadyExists,
    StorageError,
)
from .base import backend
from .options import StreamOptions
from .s3_client import _client, _error, parse

_PART_SIZE = 64 * 1024 * 1024
_MAX_PARTS = 9_000


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
    if not replace and backend(uri).exists(uri, options):
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
    if not replace and backend(uri).exists(uri, options):
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
