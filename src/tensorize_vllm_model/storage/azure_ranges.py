"""The ranged reads of Azure blobs: Get Blob over urllib3, streamed into the caller's buffer.

azure-storage-blob's ``download_blob`` returns each range as bytes (one copy in requests,
one in ``readall``): 0.17 GB/s against run:ai's 0.36 GB/s on Azurite
(benchmarks/cloud_reads.py). So a range is one GET made here, as `http` makes them
(urllib3, its proxies and CA bundle, zero-copy ``readinto`` into tensor memory), signed by
the service client's own credential objects: its ``SharedKeyCredentialPolicy`` (an account
key, from a connection string or the key setting) or azure-core's
``BearerTokenCredentialPolicy`` over its token credential (``DefaultAzureCredential``);
a SAS is already in the blob's URL (azure-storage-blob puts it there). Every GET carries
``If-Match: ETAG``: a blob replaced while it is read answers 412, "changed while it was
read".
"""

from __future__ import annotations

import email.utils
import threading
from typing import Any

from ..core.errors import AccessDenied, StorageError
from ..core.settings import ca_bundle
from . import retry
from .http import _body, send_get
from .options import StreamOptions

__all__ = ["AzureRanges"]

_TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
_TOKEN_SCOPE = "https://storage.azure.com/.default"


class _Signer:
    """Signs a request with the credential of a ``BlobServiceClient`` (thread-safe)."""

    def __init__(self, service: Any):
        from azure.core.pipeline.policies import BearerTokenCredentialPolicy

        credential = service.credential
        self.version = service.api_version
        self._lock = threading.Lock()
        if credential is None:  # a SAS (in the blob's URL), or anonymous access
            self._policy = None
        elif hasattr(credential, "get_token"):
            self._policy = BearerTokenCredentialPolicy(credential, _TOKEN_SCOPE)
        else:  # azure-storage-blob's SharedKeyCredentialPolicy
            self._policy = credential

    def headers(self, url: str, headers: dict[str, str]) -> dict[str, str]:
        """`headers` with the version, date and authorization of a GET of `url`."""
        from azure.core.pipeline import PipelineContext, PipelineRequest
        from azure.core.rest import HttpRequest

        headers = {
            **headers,
            "x-ms-version": self.version,
            "x-ms-date": email.utils.formatdate(usegmt=True),
        }
        if self._policy is None:
            return headers
        request = PipelineRequest(HttpRequest("GET", url, headers=headers), PipelineContext(None))
        with self._lock:  # the bearer policy refreshes its token in place
            self._policy.on_request(request)
        return dict(request.http_request.headers)


class AzureRanges:
    """GETs of byte ranges of one blob version (its ETag) over urllib3.

    Attributes come from the source that owns it: `name` (the URI for messages), `where`
    (the endpoint), `etag`, `size`."""

    def __init__(self, blob: Any, service: Any, options: StreamOptions, name: str, where: str):
        import urllib3

        self.url = blob.url  # quoted names; a SAS's query string where one is used
        self.name = name
        self.where = where
        self.timeout = options.timeout
        self._signer = _Signer(service)
        self._cafile = ca_bundle(options.ca_bundle)[0]
        self._workers = options.workers
        self._timeout = urllib3.Timeout(connect=min(options.timeout, 10.0), read=options.timeout)
        self.transport_errors = (OSError, urllib3.exceptions.HTTPError)

    def get(self, start: int, stop: int | None, etag: str) -> Any:
        """The response to a GET of bytes [start, stop) (to the end where `stop` is None)
        of version `etag`: 206, its body not read yet.

        Raises:
            retry.Transient: no connection, a timeout, HTTP 408/429/5xx (tried again).
            StorageError: 412 or 404 (the blob changed or went while it was read).
            AccessDenied: 401/403.
        """
        span = f"bytes={start}-{'' if stop is None else stop - 1}"
        headers = self._signer.headers(self.url, {"x-ms-range": span, "If-Match": etag})
        response = send_get(
            self.url,
            headers,
            cafile=self._cafile,
            workers=self._workers,
            timeout=self._timeout,
            name=self.name,
        )
        if response.status in (200, 206):
            return response
        response.drain_conn()
        response.release_conn()
        raise self._status_error(response.status, response.headers.get("x-ms-error-code", ""))

    def _status_error(self, status: int, code: str) -> Exception:
        answer = f"HTTP {status} {code}".strip()
        if status in _TRANSIENT_STATUSES:
            return retry.Transient(answer, answer if status in (429, 503) else None)
        if status in (404, 412):
            return StorageError(
                f"{self.name} changed while it was read ({answer}: its ETag changed or it "
                "was deleted); read it again"
            )
        if status in (401, 403):
            return AccessDenied(f"access denied reading {self.name} ({answer}) at {self.where}")
        return StorageError(f"Azure refused reading {self.name} at {self.where}: {answer}")

    def body(self, response: Any) -> retry.Body:
        return _body(response)
