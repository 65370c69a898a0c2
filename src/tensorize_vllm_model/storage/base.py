"""The storage backend contract and the registry of URI schemes.

Every scheme is served by one `Backend` subclass with the same methods and signatures;
`storage/__init__.py`, the transaction and every caller reach it only through `backend()`.
Backends are imported lazily, the first time a URI of their scheme is used, so a user pays
only for the backend used (boto3 is never imported for local files).

Adding a backend (GCS, Azure, ...) is one new module with a `Backend` subclass and one line
in `_REGISTRY` below, ``"scheme": "module:ClassName"``. The subclass maps its library's
errors to the typed errors of `errors` (`NotFound`, `AccessDenied`, `Unreachable`, `Stalled`,
`AlreadyExists`, else `StorageError`) in ONE place, with messages naming the URI.

The contract, for a backend that can write (``writable = True``): `stage` gives a private
temporary file to write; `publish` makes it appear whole at its final name (atomic: a
rename, a completed upload); `keep_aside` / `restore` / `delete` let a transaction put back
what a publish replaced (`transaction.Transaction`).
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ..errors import ConfigError, NotFound, StorageError

if TYPE_CHECKING:
    from .options import StreamOptions
    from .ranged import RangeSource

__all__ = ["Backend", "SUPPORTED_SCHEMES", "scheme_of", "backend", "join", "parent", "basename"]

# scheme -> "module:class" in this package, imported on first use.
_REGISTRY = {
    "file": "local:LocalBackend",
    "s3": "s3:S3Backend",
    "http": "http:HTTPBackend",
    "https": "http:HTTPBackend",
}
SUPPORTED_SCHEMES = tuple(_REGISTRY)
_instances: dict[str, Backend] = {}
_lock = threading.Lock()


class Backend:
    """What every storage scheme offers. Methods take the URI as given (with its scheme)
    and the `StreamOptions` of the transfer (ignored where they do not apply).

    Read side: `exists`, `open_read`, `range_source`, `read_bytes`, `list_names`.
    Write side (``writable``): `check_writable`, `stage`, `publish`, `keep_aside`,
    `restore`, `delete`. The defaults of a read-only backend raise `ConfigError`.
    """

    writable = False

    # -- names -----------------------------------------------------------------------------

    def redact(self, uri: str) -> str:
        """`uri` as it may appear in messages (no signatures, no user info)."""
        return uri

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
            raise StorageError(
                f"{source.name} is {source.size} bytes, larger than the {limit} expected"
            )
        return source.read_range(0, source.size) if source.size else b""

    def list_names(self, uri: str, options: StreamOptions) -> list[str] | None:
        """Names of the files directly in directory `uri`; None where the scheme cannot
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
        """A private (0600) temporary file to write what `publish` puts at `uri`."""
        raise self._read_only(uri)

    def being_written(self, uri: str, options: StreamOptions) -> bool:
        """Whether a staged temporary of `uri` exists (a write to it is under way); False
        where the scheme cannot tell (its temporaries are not beside the final name)."""
        return False

    def send_ahead(self, temp: str, uri: str, options: StreamOptions, *, replace: bool) -> Any:
        """Send the written `temp` towards `uri` without publishing it (S3: the parts of a
        multipart upload), so that a transaction's slow, failure-prone transfers all happen
        before any of its files is published; the handle `publish` then completes. None
        (the default): nothing is sent ahead."""
        return None

    def discard(self, sent: Any, options: StreamOptions) -> None:
        """Drop what `send_ahead` sent (S3: abort the multipart upload). Raises when that
        cannot reach the store."""

    def publish(
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


def scheme_of(uri: str | os.PathLike) -> str:
    """The scheme of `uri`: ``file`` for plain paths, else the part before ``://``.

    Raises:
        ConfigError: an unsupported scheme, listing the supported ones.
    """
    uri = os.fspath(uri)
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in _REGISTRY:
        shown = uri.split("?", 1)[0].split("#", 1)[0]
        raise ConfigError(
            f"unsupported URI scheme {scheme!r} in {shown!r}; supported: local paths, "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        )
    return scheme


def backend(uri: str | os.PathLike) -> Backend:
    """The backend serving `uri` (imported and made on first use)."""
    scheme = scheme_of(uri)
    with _lock:
        found = _instances.get(scheme)
        if found is None:
            module, _, name = _REGISTRY[scheme].partition(":")
            cls = getattr(importlib.import_module(f".{module}", __package__), name)
            found = _instances[scheme] = cls()
        return found


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
