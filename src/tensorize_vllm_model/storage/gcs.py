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
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    CredentialsError,
    NotFound,
    StorageError,
)
from ..redaction import scrubbing
from ..settings import ca_bundle, storage_variable
from . import retry
from .base import Backend, basename, join, local_temporary, parent, split_object, split_uri
from .options import StreamOptions

__all__ = ["parse", "GCSSource", "GCSBackend"]

logger = scrubbing(__name__)
T = TypeVar("T")
# Files up to this size are published by one upload; larger ones are sent ahead.
_SINGLE = 16 * 1024 * 1024
_PIECE = 1 << 20  # bytes per read from a response body
_GOOGLE = "https://storage.googleapis.com"
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
_TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
_clients: dict[StreamOptions, _Client] = {}
_clients_lock = threading.Lock()


def parse(uri: str) -> tuple[str, str]:
    """``gs://bucket/name`` -> (bucket, name) (`base.split_uri`)."""
    return split_uri(uri)


def parse_object(uri: str) -> tuple[str, str]:
    """(bucket, name) of one object. Raises `ConfigError` for a bucket or a prefix."""
    return split_object(uri, example="gs://bucket/path/model.tensors")


@dataclass(frozen=True)
class _Client:
    client: Any  # google.cloud.storage.Client
    session: Any  # google.auth.transport.requests.AuthorizedSession
    where: str  # the endpoint, for messages
    credentials: str  # how the credentials were found (never the credentials)
    base: str  # the endpoint URL requests go to


def _endpoint(options: StreamOptions) -> str | None:
    """The endpoint URL, with its scheme (google-cloud-storage's STORAGE_EMULATOR_HOST
    includes it: without one every request failed, was retried and was reported as
    "cannot reach").

    Raises:
        ConfigError: naming the setting, for an endpoint without http:// or https://.
    """
    given = options.get("gcs_endpoint")
    found = given or storage_variable("STORAGE_EMULATOR_HOST")
    if found and urllib.parse.urlsplit(found).scheme not in ("http", "https"):
        where = "stream_kwargs gcs_endpoint" if given else "STORAGE_EMULATOR_HOST"
        raise ConfigError(
            f"{where} must be a URL with its scheme, e.g. http://127.0.0.1:4443 (got {found!r})"
        )
    return found


def _credentials(options: StreamOptions) -> tuple[Any, str | None, str]:
    """(credentials, project, how they were found)."""
    from google.auth import credentials as gcreds
    from google.auth import exceptions as gauth

    path = options.get("gcs_credentials_file")
    if path:
        from google.oauth2 import service_account

        try:
            found = service_account.Credentials.from_service_account_file(path, scopes=_SCOPES)
        except (OSError, ValueError) as e:
            raise CredentialsError(f"cannot use gcs_credentials_file {path}: {e}") from None
        return found, found.project_id, path
    if _endpoint(options):
        return gcreds.AnonymousCredentials(), None, "anonymous (an emulator endpoint)"
    import google.auth

    try:
        found, project = google.auth.default(scopes=_SCOPES)
    except gauth.DefaultCredentialsError as e:
        if storage_variable("GOOGLE_APPLICATION_CREDENTIALS"):
            raise CredentialsError(
                f"GOOGLE_APPLICATION_CREDENTIALS is not a usable credentials file: {e}"
            ) from None
        raise CredentialsError(
            "no Google Cloud credentials for gs:// URIs: set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service account's key file, run `gcloud auth application-default login`, "
            "or run on Google Cloud (metadata server); for an emulator set "
            "STORAGE_EMULATOR_HOST"
        ) from None
    return found, project, "Application Default Credentials"


def _client(options: StreamOptions) -> _Client:
    """The client of `options` (cached: made once, thread-safe)."""
    with _clients_lock:
        if options in _clients:
            return _clients[options]
        import requests.adapters
        from google.auth.transport.requests import AuthorizedSession
        from google.cloud import storage as gcs

        credentials, project, how = _credentials(options)
        session = AuthorizedSession(credentials)
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=max(10, options.workers * 2))
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        cafile = ca_bundle(options.ca_bundle)[0]
        if cafile:
            session.verify = cafile
        endpoint = _endpoint(options)
        client = gcs.Client(
            project=options.get("gcs_project") or project or "-",
            credentials=credentials,
            _http=session,
            client_options={"api_endpoint": endpoint} if endpoint else None,
        )
        _clients[options] = _Client(
            client, session, endpoint or "Google Cloud Storage", how, endpoint or _GOOGLE
        )
        return _clients[options]


def _error(e: BaseException, uri: str, found: _Client, action: str) -> StorageError | None:
    """The typed error of a failed request; None where another attempt may help (the one
    place GCS failures are mapped)."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as gauth

    if isinstance(e, StorageError):
        return e
    if isinstance(e, gauth.RefreshError):
        return CredentialsError(
            f"the Google Cloud credentials ({found.credentials}) were refused {action} {uri}: {e}"
        )
    if isinstance(e, api.PreconditionFailed):
        return AlreadyExists(f"{uri} already exists; it was left as it is (not replaced)")
    if isinstance(e, (api.Forbidden, api.Unauthorized)):
        return AccessDenied(
            f"access denied {action} {uri} (HTTP {e.code}) at {found.where}; credentials: "
            f"{found.credentials}"
        )
    if isinstance(e, api.NotFound):
        return NotFound(f"no such object: {uri} (at {found.where})")
    if isinstance(e, api.GoogleAPICallError) and e.code not in _TRANSIENT_STATUSES:
        return StorageError(f"GCS refused {action} {uri} at {found.where}: {e}")
    return None


def _transient(e: BaseException) -> retry.Transient:
    from google.api_core import exceptions as api

    if isinstance(e, api.GoogleAPICallError):
        answer = f"HTTP {e.code}"
        return retry.Transient(answer, answer if e.code in (429, 503) else None)
    return retry.Transient(_short(e))


def _short(e: BaseException) -> str:
    """A transport failure in a few words: requests' wrapper names urllib3's reason."""
    inner = e.args[0] if e.args else None
    reason = getattr(inner, "reason", None) or inner or e
    return f"{type(e).__name__}: {reason}"


def _call(
    found: _Client, options: StreamOptions, uri: str, action: str, send: Callable[[], T]
) -> T:
    """`send()` (a library call with ``retry=None``), tried as the policy says, its failure
    mapped."""

    def attempt() -> T:
        try:
            return send()
        except Exception as e:  # noqa: BLE001 - mapped here, the one place
            error = _error(e, uri, found, action)
            if error is not None:
                raise error from None
            if not isinstance(e, _transport_errors()):
                raise
            raise _transient(e) from None

    return retry.request(
        attempt,
        policy=options.retry,
        name=f"{uri} at {found.where}",
        peer=f"the GCS endpoint {found.where}",
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a request or a body read raises when the connection fails (retried)."""
    import urllib3.exceptions
    from google.api_core import exceptions as api

    return (OSError, urllib3.exceptions.HTTPError, api.GoogleAPICallError)


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

    def _blob(self, uri: str, options: StreamOptions) -> tuple[Any, _Client]:
        bucket, name = parse_object(uri)
        found = _client(options)
        return found.client.bucket(bucket).blob(name), found

    def list_names(self, uri: str, options: StreamOptions) -> list[str]:
        """Names of the objects directly under the prefix ``uri/``."""
        bucket, prefix = parse(uri.rstrip("/") + "/")
        found = _client(options)

        def names() -> list[str]:
            blobs = found.client.list_blobs(
                bucket, prefix=prefix, delimiter="/", retry=None, timeout=options.timeout
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

    def publish(
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
