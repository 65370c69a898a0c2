"""Google Cloud Storage's client per options (google-cloud-storage, google-auth), its
URIs, and the one place its failures are mapped (see `gcs` for credentials and retries)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    CredentialsError,
    NotFound,
    StorageError,
)
from ..core.settings import ca_bundle, storage_variable
from . import clients, retry
from .base import split_object, split_uri
from .clients import Client, ClientCache
from .options import StreamOptions

T = TypeVar("T")
_GOOGLE = "https://storage.googleapis.com"
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
_TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)


def parse(uri: str) -> tuple[str, str]:
    """``gs://bucket/name`` -> (bucket, name) (`base.split_uri`)."""
    return split_uri(uri)


def parse_object(uri: str) -> tuple[str, str]:
    """(bucket, name) of one object. Raises `ConfigError` for a bucket or a prefix."""
    return split_object(uri, example="gs://bucket/path/model.tensors")


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


def _make_client(options: StreamOptions) -> Client:
    """The client of `options` (made once: `_client`)."""
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
    return Client(client, endpoint or "Google Cloud Storage", how, session, endpoint or _GOOGLE)


def _error(e: BaseException, uri: str, found: Client, action: str) -> StorageError | None:
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


def _call(found: Client, options: StreamOptions, uri: str, action: str, send: Callable[[], T]) -> T:
    """`send()` (a library call with ``retry=None``), tried as the policy says, its failure
    mapped (`_error`; a transport failure or HTTP 429/5xx is tried again)."""

    def mapped(e: BaseException) -> BaseException | None:
        error = _error(e, uri, found, action)
        if error is not None:
            return error
        return _transient(e) if isinstance(e, _transport_errors()) else None

    return clients.call(
        send, mapped, options=options, uri=uri, peer=f"the GCS endpoint {found.where}"
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a request or a body read raises when the connection fails (retried)."""
    import urllib3.exceptions
    from google.api_core import exceptions as api

    return (OSError, urllib3.exceptions.HTTPError, api.GoogleAPICallError)


_client = ClientCache(_make_client)  # the client of each set of options
