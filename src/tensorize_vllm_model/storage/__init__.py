"""Where files live: local paths, ``s3://`` and ``http(s)://`` URIs, behind one interface.

Schemes are resolved in one place (`_BACKENDS`); an unknown scheme is an error listing the
supported ones. Each backend is a small module (`local`, `s3`, `http`), imported only when a
URI of its scheme is used. Remote files are read through `RangeStream` (parallel byte
ranges into memory, never onto local disk).

Every write is staged: it goes to a temporary file and reaches its final name only on
`StagedWrite.commit()` (an atomic rename locally, a completed upload on S3), so an
interrupted serialize never leaves a half-written file where a reader would take it for a
model, and never damages an earlier good one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import ConfigError, StorageError
from .options import STREAM_KWARGS, StreamOptions

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_SCHEMES",
    "STREAM_KWARGS",
    "StreamOptions",
    "scheme_of",
    "is_local",
    "join",
    "parent",
    "basename",
    "local_path",
    "redact",
    "exists",
    "open_read",
    "range_source",
    "read_bytes",
    "list_names",
    "StagedWrite",
    "stage_write",
    "check_writable",
]

SUPPORTED_SCHEMES = ("file", "s3", "http", "https")
_BACKENDS = {"file": "local", "s3": "s3", "http": "http", "https": "http"}
_WRITABLE = ("file", "s3")

Options = Mapping[str, Any] | StreamOptions | None


def scheme_of(uri: str | os.PathLike) -> str:
    """The scheme of `uri`: ``file`` for plain paths, else the part before ``://``."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(
            f"unsupported URI scheme {scheme!r} in {redact(uri)!r}; supported: local paths, "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        )
    return scheme


def _backend(uri: str):
    return importlib.import_module(f".{_BACKENDS[scheme_of(uri)]}", __name__)


def is_local(uri: str | os.PathLike) -> bool:
    return scheme_of(uri) == "file"


def local_path(uri: str | os.PathLike) -> str:
    """The filesystem path of a local URI (plain path or ``file://``)."""
    uri = os.fspath(uri)
    if scheme_of(uri) != "file":
        raise ConfigError(f"{redact(uri)!r} is not a local path")
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(base: str, *parts: str) -> str:
    """Join path segments onto a path or URI with ``/``."""
    out = os.fspath(base)
    for part in parts:
        out = f"{out.rstrip('/')}/{part.lstrip('/')}" if out else part
    return out


def parent(uri: str) -> str:
    head, _, _ = uri.rstrip("/").rpartition("/")
    return head or "."


def basename(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[2]


def redact(uri: str) -> str:
    """`uri` as it may appear in messages: no query string (signatures), no user info."""
    if uri.lower().startswith(("http://", "https://")):
        from .http import redact as redact_url

        return redact_url(uri)
    return uri


def exists(uri: str, options: Options = None) -> bool:
    """Whether a file or object exists at `uri`."""
    if is_local(uri):
        return _backend(uri).exists(uri)
    return _backend(uri).exists(uri, StreamOptions.from_mapping(options))


def open_read(uri: str, options: Options = None) -> BinaryIO:
    """Open `uri` for binary reading (remote files: parallel ranged reads into memory).

    Raises:
        StorageError: naming `uri` when it cannot be opened.
    """
    backend = _backend(uri)
    if is_local(uri):
        return backend.open_read(uri)
    from .ranged import RangeStream

    opts = StreamOptions.from_mapping(options)
    return RangeStream(
        backend.source(uri, opts),
        chunk_size=opts.chunk_size,
        workers=opts.workers,
        ranges=opts.ranges,
    )


def range_source(uri: str, options: Options = None):
    """A remote file's `ranged.RangeSource`: ``read_range(start, stop)`` makes one ranged
    request (HTTP ``Range``, S3 ``GetObject`` with ``Range``); ``size`` is its length.

    Raises:
        ConfigError: for a local path (read those with ``os.pread``).
        StorageError: naming `uri` when it cannot be reached.
    """
    if is_local(uri):
        raise ConfigError(f"{uri} is a local file: read it directly")
    return _backend(uri).source(uri, StreamOptions.from_mapping(options))


def read_bytes(uri: str, options: Options = None, *, limit: int | None = None) -> bytes:
    """Read a whole (small) file; with `limit`, refuse one larger than that many bytes."""
    if is_local(uri):
        with _backend(uri).open_read(uri) as f:
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise StorageError(f"{uri} is larger than the {limit} bytes expected")
        return data
    return _backend(uri).read_bytes(uri, StreamOptions.from_mapping(options), limit)


def list_names(uri: str, options: Options = None) -> list[str] | None:
    """Names of the files directly in directory `uri`; None where the scheme cannot list
    (HTTP)."""
    scheme = scheme_of(uri)
    if scheme == "file":
        return _backend(uri).list_names(uri)
    if scheme == "s3":
        return _backend(uri).list_names(uri, StreamOptions.from_mapping(options))
    return None


@dataclass
class StagedWrite:
    """A file being written under a temporary name, published by `commit()`.

    Attributes:
        uri: the final location.
        path: the local file to write now.
        mode: the permission bits of the published file (local files).
        replace: whether `commit()` may replace a file already at `uri`; when False it
            raises `StorageError` instead and leaves that file as it is.
    """

    uri: str
    path: str
    publish: Callable[[str, str], None]
    mode: int = 0o644
    done: bool = False
    replace: bool = True

    def commit(self) -> None:
        """Publish the written file under its final name (atomically)."""
        if self.done:
            return
        try:
            os.chmod(self.path, self.mode)
        except OSError as e:
            raise StorageError(f"cannot write {self.uri}: {e.strerror or e}") from e
        self.publish(self.path, self.uri)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left behind by uploads; gone after a local rename
        self.done = True

    def abort(self) -> None:
        """Delete the temporary file; the final name is left as it was."""
        if self.done:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.done = True


class Publication:
    """Publishes several staged files as one: all of them, or none.

    A file already at a final name is first kept aside under a hidden name, so
    `rollback()` can put every name back as it was (or remove a file that did not exist
    before); `finish()` drops the kept copies once everything is published.
    """

    def __init__(self, options: Options = None):
        self._options = options
        self._published: list[tuple[str, str | None]] = []

    def commit(self, staged: StagedWrite) -> None:
        backup = None
        if staged.replace and exists(staged.uri, self._options):
            backup = join(
                parent(staged.uri), f".{basename(staged.uri)}.kept-{secrets.token_hex(4)}"
            )
            self._call("keep_aside", staged.uri, backup)
        try:
            staged.commit()
        except BaseException:
            if backup is not None:
                self._call("delete", backup)
            raise
        self._published.append((staged.uri, backup))

    def rollback(self, staged: Iterable[StagedWrite] = ()) -> None:
        """Put back every name published so far, then abort the `staged` writes (their
        temporaries are removed; committed ones are left as rolled back); errors are logged,
        not raised."""
        self._put_back()
        for item in staged:
            item.abort()

    def _put_back(self) -> None:
        while self._published:
            uri, backup = self._published.pop()
            try:
                if backup is None:
                    self._call("delete", uri)
                else:
                    self._call("restore", backup, uri)
            except Exception:  # noqa: BLE001 - the original failure is the one to report
                logger.warning("could not restore %s after a failed write", redact(uri))

    def finish(self) -> None:
        """Everything is published: drop the kept copies."""
        while self._published:
            _, backup = self._published.pop()
            if backup is not None:
                with contextlib.suppress(Exception):
                    self._call("delete", backup)

    def _call(self, name: str, *uris: str) -> None:
        backend = _backend(uris[0])
        if is_local(uris[0]):
            getattr(backend, name)(*uris)
        else:
            getattr(backend, name)(*uris, StreamOptions.from_mapping(self._options))


def stage_write(
    uri: str, options: Options = None, *, mode: int = 0o644, replace: bool = True
) -> StagedWrite:
    """Prepare to write `uri`: a private (0600) temporary file to write into now.

    Local files are staged beside their final name (so the commit is a rename); S3 objects in
    the temporary directory, uploaded at commit. With ``replace=False`` the commit never
    replaces a file that is at `uri` by then (locally a hard link, which fails on an
    existing name; on S3 a conditional write, ``If-None-Match: *``) and raises
    `StorageError` naming it.

    Raises:
        ConfigError: for a URI that cannot be written (http(s)://).
        StorageError: when the temporary file cannot be created.
    """
    scheme = scheme_of(uri)
    if scheme not in _WRITABLE:
        raise ConfigError(f"cannot write to {redact(uri)}: {scheme}:// URIs are read-only")
    backend = _backend(uri)
    if scheme == "file":
        return StagedWrite(
            uri=uri,
            path=backend.make_temp(uri),
            mode=mode,
            replace=replace,
            publish=backend.publish if replace else backend.publish_new,
        )
    opts = StreamOptions.from_mapping(options)
    backend.parse(uri)  # refuses a URI without a bucket now, not at commit
    try:
        fd, temp = tempfile.mkstemp(prefix="tensorize-vllm-model-", suffix=".staged")
        os.close(fd)
    except OSError as e:
        raise StorageError(f"cannot create a temporary file for {uri}: {e.strerror or e}") from e
    return StagedWrite(
        uri=uri,
        path=temp,
        mode=mode,
        replace=replace,
        publish=lambda path, target: backend.upload(path, target, opts, replace=replace),
    )


def _probe_directory(path: str, existing: str) -> None:
    """Create (and remove) a directory in `existing`, the nearest existing ancestor of
    `path`: `os.access` says yes to root everywhere, and nothing about /proc or sysfs."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tensorize-probe-", dir=existing))
    except OSError as e:
        raise StorageError(
            f"cannot write under {path}: cannot create a directory in "
            f"{existing} ({e.strerror or e})"
        ) from e


def check_writable(directory: str, options: Options = None) -> None:
    """Fail now, with a clear error, if files cannot be written under `directory`: before
    a serialize spends minutes loading a model.

    Local: the directory can be created and written. S3: the endpoint is allowed, the
    bucket exists and the credentials are accepted.
    """
    scheme = scheme_of(directory)
    if scheme not in _WRITABLE:
        raise ConfigError(f"cannot write to {redact(directory)}: {scheme}:// URIs are read-only")
    if scheme == "file":
        path = os.path.abspath(local_path(directory))
        existing = path
        while not os.path.exists(existing):  # the nearest ancestor that exists
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise StorageError(f"cannot write under {path}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write under {path}: {existing} is not writable")
        _probe_directory(path, existing)
        return
    _backend(directory).check_bucket(directory, StreamOptions.from_mapping(options))
