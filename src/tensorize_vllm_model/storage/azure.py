"""Azure Blob Storage (``az://container/blob``) through azure-storage-blob and azure-identity.

The account, credentials and endpoint, first found wins (docs/gcs-azure.md; the options are
``stream_kwargs`` keys, the variables Azure's CLI and SDK names):
  1. ``azure_connection_string`` / ``AZURE_STORAGE_CONNECTION_STRING`` (account, key or
     SAS, and endpoint in one; Azurite's names its ``BlobEndpoint``);
  2. ``azure_account_name`` / ``AZURE_STORAGE_ACCOUNT_NAME`` with
     ``azure_account_key`` / ``AZURE_STORAGE_ACCOUNT_KEY`` (shared key), or with
     ``azure_sas_token`` / ``AZURE_STORAGE_SAS_TOKEN``, or alone with azure-identity's
     ``DefaultAzureCredential`` (environment, workload or managed identity, Azure CLI).
The endpoint is ``azure_endpoint`` / ``AZURE_STORAGE_BLOB_ENDPOINT``, else
``https://ACCOUNT.SUFFIX`` (``AZURE_STORAGE_ENDPOINT_SUFFIX``, run:ai's name, else
``blob.core.windows.net``). A key or SAS without an account, or no account at
all, is a `CredentialsError` naming what is missing.

Reads: the blob's properties once (size, ETag), then each byte range is one Get Blob with a
``Range`` and ``If-Match: ETAG``, made over urllib3 straight into the caller's buffer and
signed by the client's credential objects (`azure_ranges`): a blob replaced while it is read
answers 412, reported as "changed while it was read".

Writes (the contract of `base`): the staged file is sent ahead as uncommitted blocks (Put
Block; nothing is visible), published by one Put Block List (with ``If-None-Match: *`` when
``replace=False``: a blob already there is never replaced). Uncommitted blocks that are
never committed are dropped by the service (after a week); nothing else is left.

Retries: azure-core's own retries are off (``retry_total=0``); every request is tried as
the one policy of `retry` says.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from .azure_ranges import AzureRanges
from .base import Backend, local_temporary, split_object, split_uri
from .clients import Client, ClientCache, setting
from .options import StreamOptions

__all__ = ["parse", "AzureSource", "AzureBackend"]

T = TypeVar("T")
_BLOCK = 32 * 1024 * 1024
_TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)


def parse(uri: str) -> tuple[str, str]:
    """``az://container/blob`` -> (container, blob) (`base.split_uri`: a SAS pasted onto
    the URI is refused; give it as ``azure_sas_token`` / ``AZURE_STORAGE_SAS_TOKEN``, or
    read the https:// blob URL with its SAS)."""
    return split_uri(uri, top="container")


def parse_object(uri: str) -> tuple[str, str]:
    return split_object(uri, top="container", example="az://container/path/model.tensors")


def _service(options: StreamOptions) -> tuple[Any, str]:
    """(BlobServiceClient, how its credentials were found)."""
    from azure.storage.blob import BlobServiceClient

    kwargs: dict[str, Any] = {
        "retry_total": 0,
        "connection_timeout": min(options.timeout, 10.0),
        "read_timeout": options.timeout,
        "max_single_get_size": max(options.chunk_size, 4 << 20),
    }
    cafile = ca_bundle(options.ca_bundle)[0]
    if cafile:
        kwargs["connection_verify"] = cafile
    connection = setting(options, "azure_connection_string", "AZURE_STORAGE_CONNECTION_STRING")
    if connection:
        try:
            return BlobServiceClient.from_connection_string(
                connection, **kwargs
            ), "a connection string"
        except ValueError as e:
            raise CredentialsError(
                f"the Azure storage connection string is not usable: {e}"
            ) from None
    account = setting(options, "azure_account_name", "AZURE_STORAGE_ACCOUNT_NAME")
    key = setting(options, "azure_account_key", "AZURE_STORAGE_ACCOUNT_KEY")
    sas = setting(options, "azure_sas_token", "AZURE_STORAGE_SAS_TOKEN")
    if not account:
        given = (
            " (AZURE_STORAGE_ACCOUNT_KEY is set)"
            if key
            else " (AZURE_STORAGE_SAS_TOKEN is set)"
            if sas
            else ""
        )
        raise CredentialsError(
            f"no Azure storage account for az:// URIs{given}: set AZURE_STORAGE_ACCOUNT_NAME "
            "(with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or an identity "
            "DefaultAzureCredential finds), or AZURE_STORAGE_CONNECTION_STRING"
        )
    suffix = storage_variable("AZURE_STORAGE_ENDPOINT_SUFFIX") or "blob.core.windows.net"
    url = setting(options, "azure_endpoint", "AZURE_STORAGE_BLOB_ENDPOINT") or (
        f"https://{account}.{suffix}"
    )
    credential, how = _credential(account, key, sas)
    try:
        return BlobServiceClient(url, credential=credential, **kwargs), how
    except ValueError as e:  # azure-storage-blob: a token credential over http://, a bad URL
        raise CredentialsError(
            f"Azure credentials ({how}) cannot be used with the endpoint {url}: {e} "
            "(set AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_TOKEN, or an https:// "
            "AZURE_STORAGE_BLOB_ENDPOINT)"
        ) from None


def _credential(account: str, key: str | None, sas: str | None) -> tuple[Any, str]:
    """(the credential azure-storage-blob takes, how it was found)."""
    if key:
        return {"account_name": account, "account_key": key}, "the account key"
    if sas:
        return sas.lstrip("?"), "a SAS token"
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(), "DefaultAzureCredential"


def _make_client(options: StreamOptions) -> Client:
    service, how = _service(options)
    return Client(service, service.url.split("?", 1)[0], how)


_client = ClientCache(_make_client)  # the client of each set of options


def _error(e: BaseException, uri: str, found: Client, action: str) -> StorageError | None:
    """The typed error of a failed request; None where another attempt may help (the one
    place Azure failures are mapped)."""
    from azure.core import exceptions as az

    if isinstance(e, StorageError):
        return e
    if isinstance(e, az.ClientAuthenticationError) and getattr(e, "status_code", None) is None:
        return CredentialsError(
            f"no usable Azure credentials ({found.credentials}) {action} {uri}: {e.message}"
        )
    if isinstance(e, az.ResourceExistsError):
        return AlreadyExists(f"{uri} already exists; it was left as it is (not replaced)")
    if isinstance(e, az.ResourceModifiedError):
        return StorageError(f"{uri} changed while it was read (its ETag changed); read it again")
    if isinstance(e, az.ResourceNotFoundError):
        if "ContainerNotFound" in str(getattr(e, "error_code", "")):
            return NotFound(f"no such container: {parse(uri)[0]} (for {uri})")
        return NotFound(f"no such blob: {uri} (at {found.where})")
    if isinstance(e, az.HttpResponseError) and e.status_code in (401, 403):
        return AccessDenied(
            f"access denied {action} {uri} (HTTP {e.status_code} {_code(e)}) at "
            f"{found.where}; credentials: {found.credentials}"
        )
    if isinstance(e, az.HttpResponseError) and e.status_code not in (None, *_TRANSIENT_STATUSES):
        return StorageError(
            f"Azure refused {action} {uri} at {found.where}: HTTP {e.status_code} {_code(e)}"
        )
    return None


def _code(e: BaseException) -> str:
    """The service's error code ("AuthenticationFailed"; azure-storage-blob gives an enum)."""
    code = getattr(e, "error_code", "") or ""
    return str(getattr(code, "value", code))


def _transient(e: BaseException) -> retry.Transient | None:
    """A failure another attempt may help (an HTTP 429/5xx, a transport error), else None."""
    from azure.core import exceptions as az

    if isinstance(e, az.HttpResponseError) and e.status_code is not None:
        answer = f"HTTP {e.status_code}"
        return retry.Transient(answer, answer if e.status_code in (429, 503) else None)
    if isinstance(e, (az.AzureError, OSError)):
        return retry.Transient(f"{type(e).__name__}: {getattr(e, 'message', e)}")
    return None


def _call(found: Client, options: StreamOptions, uri: str, action: str, send: Callable[[], T]) -> T:
    """`send()` (azure-storage-blob with ``retry_total=0``), tried as the policy says, its
    failure mapped (`_error`, `_transient`)."""
    return clients.call(
        send,
        lambda e: _error(e, uri, found, action) or _transient(e),
        options=options,
        uri=uri,
        peer=f"the Azure endpoint {found.where}",
    )


class AzureSource(retry.RetryingSource):
    """A blob (as it was when opened: its ETag) as a `ranged.RangeSource`: its properties
    through azure-storage-blob, its byte ranges as GETs over urllib3 (`azure_ranges`)."""

    supports_ranges = True
    peer = "the endpoint"

    def __init__(self, uri: str, options: StreamOptions):
        self.name = uri
        self.timeout = options.timeout
        self.policy = options.retry
        found = _client(options)
        container, name = parse_object(uri)
        blob = found.client.get_blob_client(container, name)
        props = _call(found, options, uri, "reading", lambda: blob.get_blob_properties())
        self.size = int(props.size)
        self.etag = props.etag
        self._where = found.where
        self._ranges = AzureRanges(blob, found.client, options, uri, found.where)
        self.transport_errors = self._ranges.transport_errors

    @property
    def connection(self) -> str:
        return f"the connection to {self._where}"

    def _open_range(self, start: int, stop: int, log: retry.Attempts) -> retry.Body:
        response = self._ranges.get(start, stop, self.etag or "*")
        try:
            self._check_same(response.headers.get("Content-Range"), None)
        except StorageError:
            response.release_conn()
            raise
        return self._ranges.body(response)

    def open_sequential(self, start: int) -> retry.Body:
        response = retry.request(
            lambda: self._ranges.get(start, None, self.etag or "*"),
            policy=self.policy,
            name=self.name,
            peer=self.peer,
        )
        return self._ranges.body(response)


@dataclass
class _Blocks:
    """A file sent ahead as uncommitted blocks of `uri`."""

    uri: str
    ids: list[str]


def _block_id(number: int) -> str:
    return base64.b64encode(f"tvm-{number:08d}".encode()).decode()


class AzureBackend(Backend):
    """``az://container/blob``: ranged reads pinned to an ETag; writes staged locally, sent
    ahead as uncommitted blocks, published by Put Block List."""

    writable = True
    option_keys = (
        "azure_connection_string",
        "azure_account_name",
        "azure_account_key",
        "azure_sas_token",
        "azure_endpoint",
    )

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        for key, value in values.items():
            if not isinstance(value, str) or not value:
                raise ConfigError(f"stream_kwargs {key} must be a non-empty string")
        return values

    def range_source(self, uri: str, options: StreamOptions) -> AzureSource:
        return AzureSource(uri, options)

    def _blob(self, uri: str, options: StreamOptions) -> tuple[Any, Client]:
        container, name = parse_object(uri)
        found = _client(options)
        return found.client.get_blob_client(container, name), found

    def list_names(self, uri: str, options: StreamOptions, recursive: bool = False) -> list[str]:
        """Names of the blobs directly under the prefix ``uri/`` (with `recursive`, the
        deeper ones too, as "/"-separated relative paths)."""
        container, prefix = parse(uri.rstrip("/") + "/")
        found = _client(options)
        client = found.client.get_container_client(container)

        def names() -> list[str]:
            if recursive:
                items = client.list_blobs(name_starts_with=prefix)
            else:
                items = client.walk_blobs(name_starts_with=prefix, delimiter="/")
            return [i.name[len(prefix) :] for i in items if not i.name.endswith("/")]

        return sorted(n for n in _call(found, options, uri, "listing", names) if n)

    def check_writable(self, directory: str, options: StreamOptions) -> None:
        container, _ = parse(directory)
        found = _client(options)
        client = found.client.get_container_client(container)
        _call(found, options, directory, "writing", client.get_container_properties)

    def stage(self, uri: str, options: StreamOptions) -> str:
        parse_object(uri)
        return local_temporary(uri)

    def send_ahead(self, temp: str, uri: str, options: StreamOptions, *, replace: bool) -> Any:
        if not replace and self.exists(uri, options):
            raise AlreadyExists(f"{uri} already exists; it was left as it is (not replaced)")
        blob, found = self._blob(uri, options)
        size = os.path.getsize(temp)
        count = math.ceil(size / _BLOCK)

        def send(number: int) -> str:
            with open(temp, "rb") as f:
                f.seek(number * _BLOCK)
                data = f.read(_BLOCK)
            _call(found, options, uri, "writing", lambda: blob.stage_block(_block_id(number), data))
            return _block_id(number)

        with ThreadPoolExecutor(max(1, min(options.workers, count or 1))) as pool:
            return _Blocks(uri, list(pool.map(send, range(count))))

    def discard(self, sent: Any, options: StreamOptions) -> None:
        """Nothing to send: uncommitted blocks are never visible, and the service drops
        them (a week later, or when another block list is committed)."""

    def publish_object(
        self, temp: str, uri: str, options: StreamOptions, *, replace: bool, sent: Any = None
    ) -> None:
        from azure.core import MatchConditions
        from azure.storage.blob import BlobBlock

        if sent is None:
            sent = self.send_ahead(temp, uri, options, replace=replace)
        blob, found = self._blob(uri, options)
        condition = {} if replace else {"match_condition": MatchConditions.IfMissing}
        blocks = [BlobBlock(block_id=i) for i in sent.ids]
        _call(
            found, options, uri, "publishing", lambda: blob.commit_block_list(blocks, **condition)
        )

    def keep_aside(self, uri: str, backup: str, options: StreamOptions) -> None:
        """Copy the blob at `uri` to `backup` (server-side Copy Blob, waited for)."""
        source, found = self._blob(uri, options)
        target, _ = self._blob(backup, options)
        _call(
            found, options, uri, "keeping a copy of", lambda: target.start_copy_from_url(source.url)
        )
        while True:
            props = _call(found, options, backup, "keeping a copy of", target.get_blob_properties)
            status = props.copy.status
            if status in (None, "success"):
                return
            if status != "pending":
                raise StorageError(f"copying {uri} to {backup} ended with {status}")
            retry.DEFAULT_POLICY.pause(1)

    def restore(self, backup: str, uri: str, options: StreamOptions) -> None:
        self.keep_aside(backup, uri, options)
        self.delete(backup, options)

    def delete(self, uri: str, options: StreamOptions) -> None:
        blob, found = self._blob(uri, options)
        try:
            _call(found, options, uri, "deleting", blob.delete_blob)
        except NotFound:
            pass
