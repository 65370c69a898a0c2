"""Where files live: local paths, ``s3://`` and ``http(s)://`` URIs, behind one interface.

Schemes are resolved in one place (`_BACKENDS`); an unknown scheme is an error listing the
supported ones. Every write is staged: it goes to a temporary name and reaches its final
name only on `StagedWrite.commit()`, so an interrupted serialize never leaves a half-written
file where a reader would take it for a model, and never damages an earlier good one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from .errors import ConfigError, StorageError

__all__ = [
    "SUPPORTED_SCHEMES",
    "scheme_of",
    "is_local",
    "join",
    "parent",
    "basename",
    "local_path",
    "exists",
    "open_read",
    "read_bytes",
    "StagedWrite",
    "stage_write",
]

SUPPORTED_SCHEMES = ("file", "s3", "http", "https")
_REMOTE_READ_SCHEMES = ("s3", "http", "https")


def scheme_of(uri: str | os.PathLike) -> str:
    """The scheme of `uri`: ``file`` for plain paths, else the part before ``://``."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return "file"
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise ConfigError(
            f"unsupported URI scheme {scheme!r} in {uri!r}; supported: local paths, "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        )
    return scheme


def is_local(uri: str | os.PathLike) -> bool:
    return scheme_of(uri) == "file"


def local_path(uri: str | os.PathLike) -> str:
    """The filesystem path of a local URI (plain path or ``file://``)."""
    uri = os.fspath(uri)
    if scheme_of(uri) != "file":
        raise ConfigError(f"{uri!r} is not a local path")
    return uri[len("file://"):] if uri.startswith("file://") else uri


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


def exists(uri: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether a file or object exists at `uri`."""
    if is_local(uri):
        return os.path.exists(local_path(uri))
    try:
        with open_read(uri, options):
            return True
    except StorageError:
        return False


def open_read(uri: str, options: Mapping[str, Any] | None = None) -> BinaryIO:
    """Open `uri` for binary reading.

    Args:
        uri: a local path or a remote URI.
        options: tensorizer ``open_stream`` keyword arguments for remote URIs
            (credentials, endpoint, ...).

    Raises:
        StorageError: naming `uri` when it cannot be opened.
    """
    scheme = scheme_of(uri)
    if scheme == "file":
        path = local_path(uri)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise StorageError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise StorageError(f"{path} is a directory, not a file") from None
        except OSError as e:
            raise StorageError(f"cannot open {path}: {e.strerror or e}") from e
    return _open_remote(uri, dict(options or {}))


def read_bytes(uri: str, options: Mapping[str, Any] | None = None, *, limit: int | None = None) -> bytes:
    """Read a whole (small) file; with `limit`, refuse one larger than that many bytes."""
    with open_read(uri, options) as stream:
        data = stream.read() if limit is None else stream.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise StorageError(f"{uri} is larger than the {limit} bytes expected")
    return data


def _open_remote(uri: str, options: dict[str, Any]) -> BinaryIO:
    from tensorizer.stream_io import open_stream

    stream_options = {k: v for k, v in options.items() if v is not None}
    try:
        return open_stream(uri, mode="rb", **stream_options)
    except ValueError as e:
        raise ConfigError(f"cannot open {_redact(uri)}: {e}") from None
    except OSError as e:
        raise StorageError(f"cannot open {_redact(uri)}: {e}") from None


def _redact(uri: str) -> str:
    """A URI without its query string (where signatures and tokens live)."""
    return uri.split("?", 1)[0]


@dataclass
class StagedWrite:
    """A file being written under a temporary name, published by `commit()`.

    Attributes:
        uri: the final location.
        path: the local file to write now (in the destination directory for local URIs,
            so that the commit is an atomic rename).
    """

    uri: str
    path: str
    mode: int = 0o644
    done: bool = False

    def commit(self) -> None:
        """Move the written file to its final name (atomically for local files)."""
        if self.done:
            return
        final = local_path(self.uri)
        try:
            os.chmod(self.path, self.mode)
            with open(self.path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self.path, final)
            _fsync_dir(os.path.dirname(final) or ".")
        except OSError as e:
            raise StorageError(f"cannot write {final}: {e.strerror or e}") from e
        self.done = True

    def abort(self) -> None:
        """Delete the temporary file; the final name is left as it was."""
        if self.done:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.done = True


def stage_write(uri: str, *, mode: int = 0o644) -> StagedWrite:
    """Prepare to write `uri`: create its directory and a private temporary file.

    The temporary file is created with mode 0600 (so a key is never readable by others,
    even for a moment) and gets `mode` at commit.

    Raises:
        ConfigError: for a URI that cannot be written (http(s)://).
        StorageError: when the directory cannot be created.
    """
    scheme = scheme_of(uri)
    if scheme in ("http", "https"):
        raise ConfigError(f"cannot write to {_redact(uri)}: http(s):// URIs are read-only")
    if scheme == "s3":
        raise ConfigError(
            f"cannot write {uri}: writing to S3 is not supported yet; serialize to a local "
            "directory"
        )
    final = local_path(uri)
    directory = os.path.dirname(os.path.abspath(final))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temp = tempfile.mkstemp(
            prefix=f".{os.path.basename(final)}.", suffix=f".tmp-{secrets.token_hex(4)}",
            dir=directory,
        )
        os.close(fd)
    except OSError as e:
        raise StorageError(f"cannot write into {directory}: {e.strerror or e}") from e
    return StagedWrite(uri=uri, path=temp, mode=mode)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
