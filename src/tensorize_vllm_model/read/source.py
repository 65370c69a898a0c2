"""Where a reader's bytes come from: one small protocol, `ByteSource` (``read_into(offset,
view)``: exactly the file's bytes from `offset` into `view`, or an error naming the file and
the tensor), and its implementations:

- `LocalSource`: a local file, by ``preadv`` on one descriptor (`read.local`, `read.partial`);
- `RemoteSource`: a remote file by byte ranges (`storage.range_source`), each read one
  ranged request straight into the view, or into several views in turn (`read.ranges`,
  `read.partial`);
- `StreamSource`: a remote file read in order from one stream (one response, a server
  without byte ranges: `read.remote.read_stream`).

A file that ends before a view is full is refused by the one loop of `read.checks.fill`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..format.header import pread_each
from .checks import fill

if TYPE_CHECKING:
    from ..storage.ranged import RangeSource

__all__ = ["ByteSource", "LocalSource", "RemoteSource", "StreamSource"]


class ByteSource(Protocol):
    """The bytes of one file, read at any offset."""

    name: str  # the file as named in messages (credentials redacted)
    local: bool  # a local file (`LocalSource`, with its descriptor ``fd``)

    def read_into(self, offset: int, view: memoryview, tensor: str) -> None:
        """Fill `view` with exactly the file's bytes from `offset` on (part of `tensor`).

        Raises:
            FormatError: the file ends first (naming the file and `tensor`).
            StorageError, OSError: the read fails.
        """
        ...

    def close(self) -> None: ...


class LocalSource:
    """A local file, open for ``preadv`` (one descriptor, shared by any number of threads)."""

    local = True

    def __init__(self, path: str, name: str | None = None):
        self.name = name or path
        self.fd = os.open(path, os.O_RDONLY)

    def read_into(self, offset: int, view: memoryview, tensor: str) -> None:
        fill(self._pread, view, offset, self.name, tensor)

    def _pread(self, view: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [view], offset)

    def headers(self, entries: Iterable[Any]) -> list[bytes]:
        """The tensor header of each of tensorizer's index `entries` (the file's bytes from
        ``entry.offset`` to ``entry.data_offset``), read in parallel
        (`format.header.pread_each`)."""
        return pread_each(self.fd, [(e.offset, e.data_offset - e.offset) for e in entries])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LocalSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteSource:
    """A remote file read by byte ranges: each `read_into` is one ranged request
    (`storage.ranged.RangeSource.read_range_into`, retried as `storage.retry` says)."""

    local = False

    def __init__(self, source: RangeSource):
        self.source = source
        self.name = source.name

    @property
    def size(self) -> int:
        """The file's length, in bytes, as its storage answered when it was opened."""
        return self.source.size

    def read_into(
        self, offset: int, view: memoryview | Sequence[memoryview], tensor: str = ""
    ) -> None:
        """`ByteSource.read_into`; a sequence of views is filled in turn from one request."""
        self.source.read_range_into(offset, view)

    def headers(self, entries: Iterable[Any]) -> list[bytes]:
        """The tensor header of each of tensorizer's index `entries`: one ranged request
        each."""
        return [self.source.read_range(e.offset, e.data_offset) for e in entries]

    def close(self) -> None:
        pass

    def __enter__(self) -> RemoteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamSource:
    """A remote file read in order from one seekable stream (`storage.open_read`): a read
    at another offset than where the last one ended seeks there first."""

    local = False

    def __init__(self, stream: Any, name: str):
        self.stream, self.name = stream, name
        self._at: int | None = None  # where the stream stands, once known

    def read_into(self, offset: int, view: memoryview, tensor: str) -> None:
        if offset != self._at:
            self.stream.seek(offset)
        self._at = None  # unknown if the read fails half-way
        fill(self._readinto, view, offset, self.name, tensor)
        self._at = offset + len(view)

    def _readinto(self, view: memoryview, offset: int) -> int:
        return self.stream.readinto(view)

    def close(self) -> None:
        self.stream.close()
