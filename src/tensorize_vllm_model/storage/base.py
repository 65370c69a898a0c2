"""The storage backend contract and the open registry of URI schemes.

Every scheme is served by one `Backend` subclass with the same methods and signatures;
`storage/__init__.py`, the transaction and every caller reach it only through `backend()`.
Backends are imported lazily, the first time a URI of their scheme is used (or a
``stream_kwargs`` key has to be checked), so a user pays only for the backend used: a
backend module imports its client library (boto3, google-cloud-storage, azure-storage-blob)
inside its functions, never at module level.

A backend is ONE module: a `Backend` subclass, registered under its scheme(s) by
`register_backend` (this package's own, `_BUILTIN`) or by another package through the
entry-point group ``tensorize_vllm_model.storage_backends`` (``scheme = "module:Class"``),
found the first time an unknown scheme is asked for (fsspec's registry is the model). The
subclass declares its own options (`Backend.option_keys`, validated by
`Backend.check_options`; the generic `options.StreamOptions` names none of them), and maps
its library's errors to the typed errors of `errors` (`NotFound`, `AccessDenied`,
`Unreachable`, `Stalled`, `Throttled`, `AlreadyExists`, `CredentialsError`, else
`StorageError`) in ONE place, with messages naming the URI (never a secret).

The read contract: `range_source` returns a `ranged.RangeSource`, most simply a
`retry.RetryingSource` subclass that implements ``_open_range(start, stop, log)`` (one ranged
request; the body as a `retry.Body`) and names its transport's errors in
``transport_errors`` (retried; nothing broader than the transport's own exception types,
so a bug is raised, not retried). It records the object's version (``etag``; GCS
generation, Azure ETag) when opened and refuses a range answered from another version.

The write contract (``writable = True``), which `transaction.Transaction` drives:
  1. `stage` gives a private (0600) temporary local file to write;
  2. `send_ahead` sends ALL of its bytes towards the final name without publishing
     anything (S3: the parts of a multipart upload; GCS: a hidden temporary object; Azure:
     uncommitted blocks), returning a handle; a transaction sends every file ahead before
     it publishes any, so a failed transfer leaves every name as it was;
  3. `publish_object` makes the object appear whole at once (completing the handle: S3
     CompleteMultipartUpload, GCS compose, Azure Put Block List), conditionally when
     ``replace=False`` (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
     ``If-None-Match: *``): an object already there is never overwritten, `AlreadyExists`;
  4. `discard` drops a handle that will not be published;
  5. `keep_aside` / `restore` / `delete` let a transaction put back what a publish replaced.
A backend that returns None from `send_ahead` sends everything in `publish_object`, which then must
still be all-or-nothing for its object.
"""

from __future__ import annotations

import importlib
import os
import threading
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ..core.errors import ConfigError, NotFound, StorageError, TooLarge
from ..core.redaction import has_signed_query, redact_uri, scrubbing

if TYPE_CHECKING:
    from .options import StreamOptions
    from .ranged import RangeSource

__all__ = [
    "Backend",
    "SUPPORTED_SCHEMES",
    "ENTRY_POINT_GROUP",
    "register_backend",
    "supported_schemes",
    "backend_classes",
    "backend_option_keys",
    "scheme_of",
    "backend",
    "local_temporary",
    "split_uri",
    "split_object",
    "join",
    "parent",
    "basename",
]

ENTRY_POINT_GROUP = "tensorize_vllm_model.storage_backends"
# This package's own backends: scheme -> "module:Class" (relative modules are in this
# package). Other packages register theirs through ENTRY_POINT_GROUP.
_BUILTIN = {
    "file": f"{__package__}.local:LocalBackend",
    "s3": f"{__package__}.s3:S3Backend",
    "gs": f"{__package__}.gcs:GCSBackend",
    "az": f"{__package__}.azure:AzureBackend",
    "http": f"{__package__}.http:HTTPBackend",
    "https": f"{__package__}.http:HTTPBackend",
}
SUPPORTED_SCHEMES = tuple(_BUILTIN)  # this package's own; `supported_schemes()` has all
_registry: dict[str, str] = dict(_BUILTIN)
_entry_points_read = False
_classes: dict[str, type[Backend]] = {}
_instances: dict[str, Backend] = {}
_lock = threading.RLock()
# Every backend's HTTP goes through urllib3 (ours, botocore's, requests' for google-cloud and
# azure-core), which logs each request's URL, query string included, at DEBUG.
scrubbing("urllib3.connectionpool")


class Backend:
    """What every storage scheme offers. Methods take the URI as given (with its scheme)
    and the `StreamOptions` of the transfer (ignored where they do not apply).

    Read side: `exists`, `open_read`, `range_source`, `read_bytes`, `list_names`.
    Write side (``writable``): `check_writable`, `stage`, `publish_object`, `keep_aside`,
    `restore`, `delete`. The defaults of a read-only backend raise `ConfigError`.
    """

    writable = False
    # The ``stream_kwargs`` keys this backend takes (validated by `check_options`).
    option_keys: tuple[str, ...] = ()

    @classmethod
    def check_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Validate (and normalise) this backend's options; `values` holds only keys of
        `option_keys`. Raises `ConfigError` naming the key at fault."""
        return values

    # -- names -----------------------------------------------------------------------------

    def redact(self, uri: str) -> str:
        """`uri` as it may appear in messages: no query string (signatures: a SAS, an S3 or
        GCS signed URL), no user info (`redaction.redact_uri`, the one redaction)."""
        return redact_uri(uri)

    def local_path(self, uri: str) -> str | None:
        """The filesystem path of `uri`, or None where it is not a local file."""
        return None

    # -- reading ---------------------------------------------------------------------------

    def exists(self, uri: str, options: StreamOptions) -> bool:
        """Whether a file or object is at `uri` (`NotFound` is False; other errors raise)."""
        try:
            self.range_source(uri, options)
        except NotFound:
            return False
        return True

    def range_source(self, uri: str, options: StreamOptions) -> RangeSource:
        """The file as a `ranged.RangeSource` (one ranged request per `read_range`)."""
        raise ConfigError(f"{self.redact(uri)} is a local file: read it directly")

    def open_read(self, uri: str, options: StreamOptions) -> BinaryIO:
        """A seekable binary stream of the file (remote: parallel ranged reads)."""
        from .ranged import RangeStream

        stream = RangeStream(
            self.range_source(uri, options),
            chunk_size=options.chunk_size,
            workers=options.workers,
            ranges=options.ranges,
        )
        return cast(BinaryIO, stream)

    def read_bytes(self, uri: str, options: StreamOptions, limit: int | None) -> bytes:
        """The whole (small) file; with `limit`, refuse one larger than that."""
        source = self.range_source(uri, options)
        if limit is not None and source.size > limit:
            raise TooLarge(
                f"{source.name} is {source.size} bytes, larger than the {limit} expected"
            )
        return source.read_range(0, source.size) if source.size else b""

    def list_names(
        self, uri: str, options: StreamOptions, recursive: bool = False
    ) -> list[str] | None:
        """Names of the files directly in directory `uri` (sorted), with `recursive` the
        "/"-separated relative paths of every file below it; None where the scheme cannot
        list (HTTP)."""
        return None

    # -- writing ---------------------------------------------------------------------------

    def _read_only(self, uri: str) -> ConfigError:
        scheme = scheme_of(uri)
        return ConfigError(f"cannot write to {self.redact(uri)}: {scheme}:// URIs are read-only")

    def check_writable(self, directory: str, options: StreamOptions) -> None:
        """Fail now, clearly, if files cannot be written under `directory`."""
        raise self._read_only(directory)

    def stage(self, uri: str, options: StreamOptions) -> str:
        """A private (0600) temporary file to write what `publish_object` puts at `uri`."""
        raise self._read_only(uri)

    def being_written(self, uri: str, options: StreamOptions) -> bool:
        """Whether a staged temporary of `uri` exists (a write to it is under way); False
        where the scheme cannot tell (its temporaries are not beside the final name)."""
        return False

    def send_ahead(self, temp: str, uri: str, options: StreamOptions, *, replace: bool) -> Any:
        """Send the written `temp` towards `uri` without publishing it (S3: the parts of a
        multipart upload), so that a transaction's slow, failure-prone transfers all happen
        before any of its files is published; the handle `publish_object` then completes. None
        (the default): nothing is sent ahead."""
        return None

    def discard(self, sent: Any, options: StreamOptions) -> None:
        """Drop what `send_ahead` sent (S3: abort the multipart upload). Raises when that
        cannot reach the store."""

    def publish_object(
        self, temp: str, uri: str, options: StreamOptions, *, replace: bool, sent: Any = None
    ) -> None:
        """Make the written `temp` appear whole at `uri` (completing `sent`, what
        `send_ahead` returned, if anything). With ``replace=False`` a file at `uri` is
        never replaced: `AlreadyExists` names it."""
        raise self._read_only(uri)

    def keep_aside(self, uri: str, backup: str, options: StreamOptions) -> None:
        """Keep the file at `uri` under `backup` too (it stays at `uri`)."""
        raise self._read_only(uri)

    def restore(self, backup: str, uri: str, options: StreamOptions) -> None:
        """Put the file kept at `backup` back at `uri` (and drop `backup`)."""
        raise self._read_only(uri)

    def delete(self, uri: str, options: StreamOptions) -> None:
        """Remove the file at `uri` (nothing there is not an error)."""
        raise self._read_only(uri)


def register_backend(scheme: str, target: str | type[Backend]) -> None:
    """Serve ``scheme://`` URIs with `target`: a `Backend` subclass or ``"module:Class"``
    (imported on first use). Replaces an earlier registration of `scheme`."""
    with _lock:
        _registry[scheme.lower()] = (
            target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
        )
        _classes.pop(scheme.lower(), None)
        _instances.pop(scheme.lower(), None)
        if not isinstance(target, str):
            _classes[scheme.lower()] = target


def _read_entry_points() -> None:
    """Register the backends other packages declare (once; ours stay where both name one)."""
    global _entry_points_read
    with _lock:
        if _entry_points_read:
            return
        _entry_points_read = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name.lower() not in _BUILTIN:
                _registry.setdefault(point.name.lower(), point.value)


def supported_schemes() -> tuple[str, ...]:
    """Every scheme served: this package's and those registered by other packages."""
    _read_entry_points()
    return tuple(_registry)


def _class(scheme: str) -> type[Backend]:
    with _lock:
        found = _classes.get(scheme)
        if found is None:
            module, _, name = _registry[scheme].partition(":")
            found = _classes[scheme] = getattr(importlib.import_module(module), name)
        return found


def backend_classes() -> list[type[Backend]]:
    """Every registered backend class (each imported once; light: no client library)."""
    seen: list[type[Backend]] = []
    for scheme in supported_schemes():
        cls = _class(scheme)
        if cls not in seen:
            seen.append(cls)
    return seen


def backend_option_keys() -> tuple[str, ...]:
    """The option keys of every registered backend, in registration order."""
    keys: list[str] = []
    for cls in backend_classes():
        keys.extend(k for k in cls.option_keys if k not in keys)
    return tuple(keys)


def scheme_of(uri: str | os.PathLike) -> str:
    """The scheme of `uri`: ``file`` for plain paths, else the part before ``://``.

    Raises:
        ConfigError: an unsupported scheme, listing the supported ones.
    """
    uri = os.fspath(uri)
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in _registry:
        _read_entry_points()
    if scheme not in _registry:
        shown = uri.split("?", 1)[0].split("#", 1)[0]
        raise ConfigError(
            f"unsupported URI scheme {scheme!r} in {shown!r}; supported: local paths, "
            + ", ".join(f"{s}://" for s in supported_schemes())
        )
    return scheme


def backend(uri: str | os.PathLike) -> Backend:
    """The backend serving `uri` (imported and made on first use)."""
    scheme = scheme_of(uri)
    with _lock:
        found = _instances.get(scheme)
        if found is None:
            found = _instances[scheme] = _class(scheme)()
        return found


def local_temporary(uri: str) -> str:
    """A private (0600) local file in the temporary directory, to write what a backend
    will upload to `uri` (`Backend.stage` of an object store)."""
    import tempfile

    try:
        fd, temp = tempfile.mkstemp(prefix="tensorize-vllm-model-", suffix=".staged")
        os.close(fd)
    except OSError as e:
        raise StorageError(f"cannot create a temporary file for {uri}: {e.strerror or e}") from e
    return temp


def join(base: str, *parts: str) -> str:
    """Join path segments onto a path or URI with ``/``."""
    out = os.fspath(base)
    for part in parts:
        out = f"{out.rstrip('/')}/{part.lstrip('/')}" if out else part
    return out


def parent(uri: str) -> str:
    """The directory of `uri` (``.`` for a bare name)."""
    head, _, _ = uri.rstrip("/").rpartition("/")
    return head or "."


def basename(uri: str) -> str:
    """The last segment of `uri`."""
    return uri.rstrip("/").rpartition("/")[2]


def split_uri(uri: str, *, top: str = "bucket") -> tuple[str, str]:
    """``SCHEME://TOP/NAME`` -> (TOP, NAME) for the object stores (s3://, gs://, az://; TOP
    is the bucket or container, `top` names it in messages).

    Raises:
        ConfigError: no bucket; or a signed query string pasted onto the URI (a SAS, an S3
            or GCS signature: it is a credential, not part of a name), shown without it.
    """
    if has_signed_query(uri):
        scheme = uri.split("://", 1)[0]
        raise ConfigError(
            f"{redact_uri(uri)}: {scheme}:// URIs take no signed query string; read "
            "the signed https:// URL as it is, or give the credential as the backend's "
            "setting (docs/s3.md, docs/gcs-azure.md)"
        )
    first, _, name = uri.split("://", 1)[1].partition("/")
    if not first:
        raise ConfigError(f"{uri!r} names no {top}")
    return first, name


def split_object(uri: str, *, top: str = "bucket", example: str) -> tuple[str, str]:
    """`split_uri` for an operation on one object: (TOP, NAME).

    Raises:
        ConfigError: as `split_uri`; or no name (a bucket alone), or a prefix (ending in
            ``/``), the message showing `example` (``s3://bucket/path/model.tensors``).
    """
    first, name = split_uri(uri, top=top)
    if not name:
        raise ConfigError(
            f"{uri!r} names a {top}, not an object: give the object's name ({example})"
        )
    if name.endswith("/"):
        raise ConfigError(f"{uri!r} names a prefix (it ends in '/'), not an object ({example})")
    return first, name
