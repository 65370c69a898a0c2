"""A seekable binary stream over a remote object, fetched in parallel byte ranges.

`RangeStream` turns any `RangeSource` (an S3 object, an HTTP(S) URL) into a file object that
tensorizer reads sequentially, while a small pool of threads fetches the next chunks ahead
of it. Nothing touches local disk. Sources that cannot serve byte ranges (some HTTP servers)
are read as one sequential response, straight into the caller's buffer.

The read-ahead window is ``workers`` buffers of ``chunk_size`` bytes (the chunk being read
and those fetched ahead), made once per stream and reused: each is an anonymous memory
mapping of its own, not memory from malloc, so it goes back to the system when the stream
closes. (Fetched as a new ``bytes`` per chunk in the worker threads, the freed chunks stayed
in glibc's per-thread arenas: 138-379 MB of a 256 MiB file stayed resident after a load.)
"""

from __future__ import annotations

import io
import mmap
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from ..core.errors import Stalled, StorageError, Unreachable
from .retry import TransferStalled

__all__ = [
    "RangeSource",
    "RangeStream",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_WORKERS",
    "KEEP_BYTES",
]

DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_WORKERS = 4
# The first bytes of a one-response read, kept: checking a file's start and then reading its
# header from byte 0 again costs no second request (tensorizer's header and index of a
# large model fit).
KEEP_BYTES = 1 << 20


class RangeSource(Protocol):
    """What a remote backend offers `RangeStream`."""

    name: str  # for messages; never holds credentials or signatures
    size: int
    supports_ranges: bool
    timeout: float  # seconds without data before a read gives up

    def read_range(self, start: int, stop: int) -> bytes:
        """Exactly the bytes [start, stop), or raise StorageError."""

    def read_range_into(self, start: int, view: memoryview | Sequence[memoryview]) -> None:
        """Fill `view` with exactly the bytes from `start` on, or raise StorageError; a
        sequence of views is filled in turn from one request (a scatter read)."""

    def open_sequential(self, start: int) -> io.RawIOBase:
        """A stream of the bytes from `start` to the end (for sources without ranges)."""


class RangeStream(io.RawIOBase):
    """A read-only, seekable view of a `RangeSource` with read-ahead."""

    def __init__(
        self,
        source: RangeSource,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int = DEFAULT_WORKERS,
        ranges: bool = True,
    ):
        super().__init__()
        self.source = source
        self.name = source.name
        self._size = source.size
        self._chunk = max(1, chunk_size)
        self._workers = max(1, workers)
        self._pos = 0
        self._lock = threading.RLock()  # a done fetch's release may run inside it
        self._futures: dict[int, Future[memoryview]] = {}
        self._free: list[mmap.mmap] = []  # window buffers not in use
        self._closing = False
        self._pool: ThreadPoolExecutor | None = None
        self._sequential: io.RawIOBase | None = None
        self._sequential_pos = 0
        self._kept = bytearray()
        self._ranges = ranges and source.supports_ranges

    # -- io.RawIOBase ----------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    @property
    def chunk_size(self) -> int:
        """Bytes per ranged request."""
        return self._chunk

    @property
    def workers(self) -> int:
        """Ranged requests in flight at most."""
        return self._workers

    @property
    def one_response(self) -> bool:
        """Whether the object is read as one sequential response (no byte ranges)."""
        return not self._ranges

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        if not self._ranges:
            return self._read_sequential(view[:want])
        done = 0
        while done < want:
            index = self._pos // self._chunk
            data = self._chunk_data(index)
            offset = self._pos - index * self._chunk
            count = min(len(data) - offset, want - done)
            if count <= 0:
                raise StorageError(f"{self.name}: short read at byte {self._pos}")
            view[done : done + count] = data[offset : offset + count]
            done += count
            self._pos += count
        return done

    def close(self) -> None:
        if self.closed:
            return
        with self._lock:
            self._closing = True
            futures = list(self._futures.values())
            self._futures.clear()
        for future in futures:
            self._drop(future)
        if self._pool is not None:
            # A fetch under way unmaps its buffer when it ends (see _drop).
            self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for buffer in self._free:
                _unmap(buffer)
            self._free.clear()
        if self._sequential is not None:
            self._sequential.close()
        self._kept = bytearray()
        super().close()

    # -- ranged reading --------------------------------------------------------------------

    def _chunk_data(self, index: int) -> memoryview:
        last = (self._size - 1) // self._chunk
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="tvm-range")
            for stale in [i for i in self._futures if i < index or i >= index + self._workers]:
                self._drop(self._futures.pop(stale))
            for ahead in range(index, min(index + self._workers, last + 1)):
                if ahead not in self._futures:
                    start = ahead * self._chunk
                    stop = min(start + self._chunk, self._size)
                    buffer = self._free.pop() if self._free else mmap.mmap(-1, self._chunk)
                    future = self._pool.submit(self._fetch, buffer, start, stop)
                    future.buffer = buffer  # type: ignore[attr-defined]
                    self._futures[ahead] = future
            future = self._futures[index]
        return future.result()

    def _fetch(self, buffer: mmap.mmap, start: int, stop: int) -> memoryview:
        view = memoryview(buffer)[: stop - start]
        self.source.read_range_into(start, view)
        return view

    def _drop(self, future: Future[memoryview]) -> None:
        """Give up a chunk: its buffer returns to the window once no fetch writes into it."""
        future.cancel()
        buffer: mmap.mmap = future.buffer  # type: ignore[attr-defined]

        def release(done: Future) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().release()
            with self._lock:
                if self._closing or len(self._free) >= self._workers:
                    _unmap(buffer)
                else:
                    self._free.append(buffer)

        future.add_done_callback(release)

    # -- sequential reading (no range support) ---------------------------------------------

    def _read_sequential(self, view: memoryview) -> int:
        done = 0
        if self._pos < len(self._kept):  # the first bytes again: no new request for them
            done = min(len(view), len(self._kept) - self._pos)
            view[:done] = self._kept[self._pos : self._pos + done]
        start = self._pos + done
        if done < len(view) and (self._sequential is None or start < self._sequential_pos):
            if self._sequential is not None:
                self._sequential.close()
            self._sequential = self.source.open_sequential(0)
            self._sequential_pos = 0
        stream = self._sequential
        try:
            while done < len(view) and self._sequential_pos < start:  # forward: read and drop
                assert stream is not None
                skip = stream.read(min(start - self._sequential_pos, 1 << 20))
                if not skip:
                    break
                self._passed(skip)
            while done < len(view) and self._sequential_pos == self._pos + done:
                assert stream is not None
                count = stream.readinto(view[done:])
                if not count:
                    break
                self._passed(view[done : done + count])
                done += count
        except StorageError:
            raise
        except TransferStalled:
            raise Stalled(
                f"{self.name}: the transfer stalled after {self._sequential_pos} of "
                f"{self._size} bytes (no data for {self.source.timeout:g} s)"
            ) from None
        except Exception as e:  # noqa: BLE001 - the transport's own error, reported below
            raise Unreachable(
                f"{self.name}: the connection ended at byte {self._sequential_pos} of "
                f"{self._size} ({type(e).__name__})"
            ) from None
        if done < len(view):
            raise Unreachable(
                f"{self.name}: the connection ended at byte {self._sequential_pos} of {self._size}"
            )
        self._pos += done
        return done

    def _passed(self, data) -> None:
        """`data` was read from the response at `_sequential_pos`: move past it, keeping
        the response's first KEEP_BYTES."""
        if self._sequential_pos == len(self._kept) < KEEP_BYTES:
            self._kept += data[: KEEP_BYTES - len(self._kept)]
        self._sequential_pos += len(data)


def _unmap(buffer: mmap.mmap) -> None:
    try:
        buffer.close()
    except BufferError:  # a view of it is still alive: unmapped when it is collected
        pass
