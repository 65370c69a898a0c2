"""Where files live: local paths, ``s3://``, ``gs://``, ``az://`` and ``http(s)://`` URIs,
behind one contract.

Each scheme is served by a `base.Backend` subclass (`local`, `s3`, `gcs`, `azure`, `http`),
found through the open registry in `base` (another package adds a scheme through the
``tensorize_vllm_model.storage_backends`` entry-point group) and imported only when a URI of
its scheme is used; an unknown scheme is an error listing the supported ones. A new backend
is one module and its registration: nothing here changes. Remote files are read through
`ranged.RangeStream` (parallel byte ranges into memory, never onto local disk), with one
retry policy (`retry.RetryPolicy`, carried by `StreamOptions.retry`; its module docstring
says which layer retries which failure).

Errors are typed (`errors.NotFound`, `AccessDenied`, `Unreachable`, `Stalled`, `Throttled`,
`AlreadyExists`, all `StorageError`s) and name the URI: catch a type, never match a message.

Every write goes through a transaction (`transaction`): staged under a temporary name,
published all together on success, rolled back on any failure, so an interrupted serialize
never leaves a half-written file where a reader would take it for a model, and never damages
an earlier good one.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from ..core.errors import (
    AccessDenied,
    AlreadyExists,
    ConfigError,
    NotFound,
    Stalled,
    StorageError,
    Throttled,
    Unreachable,
)
from ..core.redaction import redact_uri
from .base import (
    SUPPORTED_SCHEMES,
    Backend,
    backend,
    basename,
    join,
    parent,
    register_backend,
    scheme_of,
    supported_schemes,
)
from .options import GENERIC_KEYS, Options, StreamOptions, stream_kwargs_keys
from .staged import StagedDirectory, StagedWrite, temporary_directories
from .transaction import Transaction, transaction

__all__ = [
    "SUPPORTED_SCHEMES",
    "supported_schemes",
    "register_backend",
    "GENERIC_KEYS",
    "stream_kwargs_keys",
    "StreamOptions",
    "Options",
    "Backend",
    "backend",
    "scheme_of",
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
    "check_writable",
    "being_written",
    "StagedWrite",
    "StagedDirectory",
    "temporary_directories",
    "Transaction",
    "transaction",
    "StorageError",
    "NotFound",
    "AccessDenied",
    "Unreachable",
    "Stalled",
    "Throttled",
    "AlreadyExists",
]


def _options(options: Options) -> StreamOptions:
    return StreamOptions.from_mapping(options)


def local_path(uri: str | os.PathLike) -> str | None:
    """The filesystem path of `uri` where it is a local file (plain path or ``file://``),
    else None: for code that truly needs a path (``os.pread``, ``mmap``)."""
    uri = os.fspath(uri)
    return backend(uri).local_path(uri)


def redact(uri: str) -> str:
    """`uri` as it may appear in messages: no query string (signatures), no user info."""
    try:
        return backend(uri).redact(uri)
    except ConfigError:  # an unsupported scheme: still never show a query string
        return redact_uri(uri)


def exists(uri: str, options: Options = None) -> bool:
    """Whether a file or object exists at `uri`."""
    return backend(uri).exists(uri, _options(options))


def open_read(uri: str, options: Options = None) -> BinaryIO:
    """Open `uri` for binary reading (remote files: parallel ranged reads into memory).

    Raises:
        NotFound, AccessDenied, Unreachable, StorageError: naming `uri`.
    """
    return backend(uri).open_read(uri, _options(options))


def range_source(uri: str, options: Options = None) -> Any:
    """A remote file's `ranged.RangeSource`: ``read_range(start, stop)`` makes one ranged
    request (HTTP ``Range``, S3 ``GetObject`` with ``Range``); ``size`` is its length.

    Raises:
        ConfigError: for a local path (read those with ``os.pread``; see `local_path`).
        StorageError: naming `uri` when it cannot be reached.
    """
    return backend(uri).range_source(uri, _options(options))


def read_bytes(uri: str, options: Options = None, *, limit: int | None = None) -> bytes:
    """Read a whole (small) file; with `limit`, refuse one larger than that many bytes."""
    return backend(uri).read_bytes(uri, _options(options), limit)


def list_names(uri: str, options: Options = None, *, recursive: bool = False) -> list[str] | None:
    """Names of the files directly in directory `uri` (sorted); with `recursive`, the
    "/"-separated relative paths of every file below it. None where the scheme cannot list
    (HTTP)."""
    return backend(uri).list_names(uri, _options(options), recursive)


def being_written(uri: str, options: Options = None) -> bool:
    """Whether a transaction's staged temporary of `uri` exists: a write to it is under way
    (or its writer died before it could roll back). False where the scheme cannot tell."""
    return backend(uri).being_written(uri, _options(options))


def check_writable(directory: str, options: Options = None) -> None:
    """Fail now, with a clear error, if files cannot be written under `directory`: before
    a serialize spends minutes loading a model.

    Local: the directory can be created and written. S3: the endpoint is allowed, the
    bucket exists and the credentials are accepted.

    Raises:
        ConfigError: a read-only scheme (http(s)://).
        NotFound, AccessDenied, StorageError: naming `directory`.
    """
    backend(directory).check_writable(directory, _options(options))
