"""Google Cloud Storage (``gs://bucket/object``) through google-cloud-storage and google-auth.

Credentials, first found wins (docs/gcs-azure.md): ``gcs_credentials_file`` (a service
account's JSON key); with an emulator (``gcs_endpoint``, else ``STORAGE_EMULATOR_HOST``, as
google-cloud-storage reads it) none (anonymous); else Application Default Credentials
(google-auth: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's ADC file, the metadata server).
None found is a `CredentialsError` naming what to set.

Reads: the object's metadata once (size, generation), then each byte range is one GET of
that generation (``?generation=G&alt=media``, a ``Range`` header) through google-auth's
authorized session, streamed by urllib3 straight into the range's buffer. A range answered
from another generation, or a generation that is gone (the object was replaced), is refused:
the object changed while it was read.

Writes (the contract of `base`): a file up to `_SINGLE` bytes is published by one upload;
a larger one is sent ahead as a hidden temporary object beside its final name
(``.NAME.sending-XXXX``) and published by ``compose`` onto the final name, then the
temporary is deleted. With ``replace=False`` both carry ``ifGenerationMatch=0``: an object
already at the name is never replaced (fake-gcs-server honours it for uploads only, so a
check just before the compose catches an emulator that ignores it).

Every request is tried as the one retry policy says (`retry`): the library's own retries are
switched off (``retry=None``), a connection failure, a timeout, HTTP 429 or 5xx is retried
by `retry.request` / `retry.read_range_into`, anything else is raised at once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..core.errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    CredentialsError,
    NotFound,
    StorageError,
)
from ..core.redaction import scrubbing
from . import retry
from .base import Backend, basename, join, local_temporary, parent
from .clients import Client
from .gcs_client import (
    _TRANSIENT_STATUSES,
    _call,
    _client,
    _short,
    parse,
    parse_object,
)
from .options import StreamOptions

__all__ = ["parse", "GCSSource", "GCSBackend"]

logger = scrubbing(__name__)
# Files up to this size are published by one upload; larger ones are sent ahead.
_SINGLE = 16 * 1024 * 1024
_PIECE = 1 << 20  # bytes per read from a response body


class GCSSource(retry.RetryingSource):
    """One generation of a GCS object as a `ranged.RangeSource`."""

    supports_ranges = True
    peer = "the endpoint"

    def __init__(self, uri: str, options: StreamOptions):
        import urllib3.exceptions

        self.name = uri
        self.timeout = options.timeout
        self.policy = options.retry
        self.transport_errors = (OSError, urllib3.exceptions.HTTPError)
        self.bucket, self.object = parse_object(uri)
        self._found = _client(options)
        bucket = self._found.client.bucket(self.bucket)
        blob = _call(
            self._found,
            options,
            uri,
            "reading",
            lambda: bucket.get_blob(self.object, retry=None, timeout=self.timeout),
        )
        if blob is None:
            if not _call(
                self._found,
                options,
                uri,
                "reading",
                lambda: bucket.exists(retry=None, timeout=self.timeout),
            ):
                raise NotFound(f"no such bucket: {self.bucket} (for {uri})")
            raise NotFound(f"no such object: {uri} (at {self._found.where})")
        self.size = int(blob.size or 0)
        self.generation = str(blob.generation)
        self.etag = None  # the generation is the version checked (x-goog-generation)
        self._url = (
            f"{self._found.base.rstrip('/')}/download/storage/v1/b/"
            f"{urllib.parse.quote(self.bucket, safe='')}/o/"
            f"{urllib.parse.quote(self.object, safe='')}?alt=media&generation={self.generation}"
        )

    @property
    def connection(self) -> str:
        return f"the connection to {self._found.where}"

    def _get(self, headers: dict[str, str]) -> Any:
        import requests

        try:
            response = self._found.session.get(
                self._url,
                headers={"Accept-Encoding": "identity", **headers},
                stream=True,
                timeout=(min(self.timeout, 10.0), self.timeout),
            )
        except requests.RequestException as e:
            raise retry.Transient(_short(e)) from None
        if response.status_code in (200, 206):
            self._check_generation(response.headers.get("x-goog-generation"))
            return response
        response.close()
        status = response.status_code
        if status in _TRANSIENT_STATUSES:
            raise retry.Transient(
                f"HTTP {status}", f"HTTP {status}" if status in (429, 503) else None
            )
        if status == 404:
            raise StorageError(
                f"{self.name} changed while it was read: generation {self.generation} is gone "
                "(the object was replaced or deleted); read it again"
            )
        if status in (401, 403):
            raise AccessDenied(
                f"access denied reading {self.name} (HTTP {status}) at {self._found.where}"
            )
        raise StorageError(f"GCS refused reading {self.name} at {self._found.where}: HTTP {status}")

    def _check_generation(self, generation: str | None) -> None:
        if generation and generation != self.generation:
            raise StorageError(
                f"{self.name} changed while it was read: its generation is {generation} now, "
                f"{self.generation} when it was opened; read it again"
            )

    def _open_range(self, start: int, stop: int, log: retry.Attempts) -> retry.Body:
        response = self._get({"Range": f"bytes={start}-{stop - 1}"})
        try:
            self._check_same(response.headers.get("Content-Range"), None)
        except StorageError:
            response.close()
            raise
        return _body(response)

    def open_sequential(self, start: int) -> retry.Body:
        """One GET from `start` to the end (``stream_kwargs={"ranges": false}``)."""
        response = retry.request(
            lambda: self._get({"Range": f"bytes={start}-"}),
            policy=self.policy,
            name=self.name,
            peer=self.peer,
        )
        return _body(response)


def _body(response: Any) -> retry.Body:
    """A requests response streamed into the caller's buffer (urllib3's readinto); a stall
    (no data for the read timeout) is reported as `TransferStalled`."""
    import urllib3.exceptions

    return retry.Body(
        response.raw.readinto,
        response.close,
        piece=_PIECE,
        stall_errors=(urllib3.exceptions.ReadTimeoutError, TimeoutError),
    )


@dataclass
class _Sent:
    """A file sent ahead as the temporary object `temporary`, not published yet."""

    uri: str
    temporary: str
    options: StreamOptions


class GCSBackend(Backend):
    """``gs://bucket/name``: ranged reads of one generation; writes staged locally, sent
    ahead as a hidden temporary object, published by compose (or one upload)."""

    writable = True
    option_keys = ("gcs_project", "gcs_credentials_file", "gcs_endpoint")

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        for key, value in values.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(f"stream_kwargs {key} must be a non-empty string")
        path = values.get("gcs_credentials_file")
        if path and not os.path.isfile(path):
            raise CredentialsError(f"gcs_credentials_file {path} does not exist")
        return values

    def range_source(self, uri: str, options: StreamOptions) -> GCSSource:
        return GCSSource(uri, options)

    def _blob(self, uri: str, options: StreamOptions) -> tuple[Any, Client]:
        bucket, name = parse_object(uri)
        found = _client(options)
        return found.client.bucket(bucket).blob(name), found

    def list_names(self, uri: str, options: StreamOptions, recursive: bool = False) -> list[str]:
        """Names of the objects directly under the prefix ``uri/`` (with `recursive`, the
        deeper ones too, as "/"-separated relative paths)."""
        bucket, prefix = parse(uri.rstrip("/") + "/")
        found = _client(options)

        def names() -> list[str]:
            blobs = found.client.list_blobs(
                bucket,
                prefix=prefix,
                delimiter=None if recursive else "/",
                retry=None,
                timeout=options.timeout,
            )
            return [b.name[len(prefix) :] for b in blobs]

        return sorted(n for n in _call(found, options, uri, "listing", names) if n)

    def check_writable(self, directory: str, options: StreamOptions) -> None:
        """The bucket exists and the credentials may use it."""
        bucket, _ = parse(directory)
        found = _client(options)
        try:
            _call(
                found,
                options,
                directory,
                "writing",
                lambda: found.client.get_bucket(bucket, retry=None, timeout=options.timeout),
            )
        except NotFound:
            raise NotFound(f"no such bucket: {bucket} (for {directory})") from None

    def stage(self, uri: str, options: StreamOptions) -> str:
        parse_object(uri)
        return local_temporary(uri)

    def send_ahead(self, temp: str, uri: str, options: StreamOptions, *, replace: bool) -> Any:
        if os.path.getsize(temp) <= _SINGLE:
            return None  # one upload, when published
        if not replace and self.exists(uri, options):
            raise AlreadyExists(f"{uri} already exists; it was left as it is (not replaced)")
        sent = _Sent(
            uri, join(parent(uri), f".{basename(uri)}.sending-{secrets.token_hex(4)}"), options
        )
        blob, found = self._blob(sent.temporary, options)
        try:
            _call(
                found,
                options,
                uri,
                "writing",
                lambda: blob.upload_from_filename(
                    temp, if_generation_match=0, retry=None, timeout=max(options.timeout, 600.0)
                ),
            )
        except BaseException:  # Ctrl-C as the upload ends: the caller never gets the handle
            with contextlib.suppress(Exception):
                self.discard(sent, options)
            raise
        return sent

    def discard(self, sent: Any, options: StreamOptions) -> None:
        self.delete(sent.temporary, options)

    def publish_object(
        self, temp: str, uri: str, options: StreamOptions, *, replace: bool, sent: Any = None
    ) -> None:
        blob, found = self._blob(uri, options)
        condition = {} if replace else {"if_generation_match": 0}
        if sent is None:
            _call(
                found,
                options,
                uri,
                "writing",
                lambda: blob.upload_from_filename(
                    temp, retry=None, timeout=max(options.timeout, 600.0), **condition
                ),
            )
            return
        try:
            if not replace and self.exists(uri, options):  # emulators ignore the condition
                raise AlreadyExists(f"{uri} already exists; it was left as it is (not replaced)")
            source, _ = self._blob(sent.temporary, options)
            _call(
                found,
                options,
                uri,
                "publishing",
                lambda: blob.compose([source], retry=None, timeout=options.timeout, **condition),
            )
        finally:
            try:
                self.discard(sent, options)
            except StorageError as e:
                logger.warning("could not delete the temporary object %s: %s", sent.temporary, e)

    def keep_aside(self, uri: str, backup: str, options: StreamOptions) -> None:
        """Copy the object at `uri` to `backup` (server-side rewrite, in as many calls as
        GCS asks for)."""
        source, found = self._blob(uri, options)
        target, _ = self._blob(backup, options)
        token: str | None = None

        def step() -> tuple[str | None, int, int]:
            return target.rewrite(source, token=token, retry=None, timeout=options.timeout)

        while True:
            token, _, _ = _call(found, options, uri, "keeping a copy of", step)
            if token is None:
                return

    def restore(self, backup: str, uri: str, options: StreamOptions) -> None:
        self.keep_aside(backup, uri, options)
        self.delete(backup, options)

    def delete(self, uri: str, options: StreamOptions) -> None:
        blob, found = self._blob(uri, options)
        try:
            _call(
                found,
                options,
                uri,
                "deleting",
                lambda: blob.delete(retry=None, timeout=options.timeout),
            )
        except NotFound:
            pass
