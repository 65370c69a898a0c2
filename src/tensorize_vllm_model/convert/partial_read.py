"""Reading parts of tensors: given each tensor's needed byte range, read only those bytes
(local ``pread``, one HTTP/S3 range request each), in parallel and a bounded window ahead.

Each tensor lands in a fresh buffer of its full stored size, filled only over the range
read: the rest is never touched, so on the CPU its pages are never made resident (the
loader's weight loaders read nothing outside the range; `regions` checked that). In an
encrypted file a range is widened to whole cipher chunks, and each chunk is checked and
decrypted on its own (`tensor_decryption`).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .. import storage
from ..errors import EncryptionError, FormatError, StorageError

__all__ = ["Part", "PartsRead", "read_parts"]

PIECE_BYTES = 8 << 20  # one read request
WINDOW_BYTES = 64 << 20  # bytes read ahead of the tensor being handed over (peak memory:
# a part larger than this is read alone, so buffers hold at most max(this, one part))


@dataclass(frozen=True)
class Part:
    """Bytes [start, stop) of one tensor's stored data; `entry` is tensorizer's index entry
    (its ``data_offset`` and ``data_length``), `cipher` its chunk cipher when encrypted."""

    name: str
    entry: Any
    start: int
    stop: int
    cipher: Any = None
    # (start, stop, tensor): bytes read straight into these CPU tensors (parameters'
    # memory), instead of into a buffer; only for plain (unencrypted) parts
    targets: tuple[tuple[int, int, torch.Tensor], ...] = ()

    @property
    def span(self) -> tuple[int, int]:
        """The range actually read: whole cipher chunks when encrypted."""
        if self.cipher is None:
            return self.start, self.stop
        size = self.cipher.chunk_size
        return (
            self.start // size * size,
            min(self.entry.data_length, -(-self.stop // size) * size),
        )


@dataclass
class PartsRead:
    """What `read_parts` read: bytes and requests."""

    bytes: int = 0
    requests: int = 0


class _Reader:
    def __init__(self, uri: str, options: storage.Options):
        self.uri = uri
        path = storage.local_path(uri)
        self.local = path is not None
        if path is not None:
            self.fd = os.open(path, os.O_RDONLY)
        else:
            self.source = storage.range_source(uri, options)

    def read_into(self, view: memoryview, offset: int) -> None:
        if not self.local:
            self.source.read_range_into(offset, view)
            return
        got = 0
        while got < len(view):
            count = os.preadv(self.fd, [view[got:]], offset + got)
            if count == 0:
                raise FormatError(f"{self.uri} is truncated: it ends before byte {offset + got}")
            got += count

    def close(self) -> None:
        if self.local:
            os.close(self.fd)


def _fill(reader: _Reader, part: Part, memory: torch.Tensor, place: int, lo: int, hi: int) -> None:
    """Read the tensor's bytes [lo, hi) into the uint8 CPU tensor `memory` at byte `place`
    (and decrypt them in place when the part is encrypted)."""
    from ..local_read import _populate

    _populate(memory.data_ptr() + place, hi - lo)  # its pages made present in one call
    view = memoryview(memory.numpy())[place : place + hi - lo]
    reader.read_into(view, part.entry.data_offset + lo)
    if part.cipher is not None:
        from ..tensor_decryption import DecryptionFailed

        try:
            part.cipher.decrypt(view, lo)
        except DecryptionFailed:
            raise EncryptionError(
                f"cannot decrypt {reader.uri}: wrong key (or corrupted data) in tensor {part.name}"
            ) from None


def _submit_direct(pool: ThreadPoolExecutor, reader: _Reader, part: Part) -> list[Future]:
    """Read each target's bytes straight into its tensor, in pieces."""
    futures = []
    for lo, hi, tensor in part.targets:
        flat = tensor.view(-1).view(torch.uint8)
        for at in range(lo, hi, PIECE_BYTES):
            futures.append(
                pool.submit(_fill, reader, part, flat, at - lo, at, min(hi, at + PIECE_BYTES))
            )
    return futures


def _size(part: Part) -> int:
    """The bytes a part holds in memory while it waits: its read span in a buffer, nothing
    extra when read straight into its targets (counted as their bytes)."""
    return part.stop - part.start if part.targets else part.span[1] - part.span[0]


def read_parts(
    uri: str,
    parts: Sequence[Part],
    *,
    threads: int,
    options: storage.Options = None,
    stats: PartsRead | None = None,
) -> Iterator[tuple[Part, torch.Tensor]]:
    """Yield (part, buffer) in the order of `parts`: `buffer` is a uint8 CPU tensor of the
    tensor's stored length whose bytes [part.span) are read (and decrypted); None for a part
    with `targets`, whose bytes are then already in those tensors.

    Raises:
        StorageError: the file cannot be read.
        FormatError: it ends before a part does.
        EncryptionError: a chunk fails its check.
    """
    stats = stats if stats is not None else PartsRead()
    reader = _Reader(uri, options)
    pool = ThreadPoolExecutor(max(1, threads))
    pending: collections.deque[tuple[Part, torch.Tensor, list[Future]]] = collections.deque()
    queued = 0
    todo = iter(parts)
    part = next(todo, None)
    try:
        while True:
            # read ahead while the window holds the next part too (one part at least)
            while part is not None and (not pending or queued + _size(part) <= WINDOW_BYTES):
                if part.targets:
                    futures = _submit_direct(pool, reader, part)
                    pending.append((part, None, futures))
                    stats.bytes += part.stop - part.start
                    stats.requests += len(futures)
                    queued += part.stop - part.start
                    part = next(todo, None)
                    continue
                buffer = torch.empty(part.entry.data_length, dtype=torch.uint8)
                lo, hi = part.span
                step = PIECE_BYTES
                if part.cipher is not None:  # pieces of whole chunks
                    step = max(1, PIECE_BYTES // part.cipher.chunk_size) * part.cipher.chunk_size
                futures = [
                    pool.submit(_fill, reader, part, buffer, at, at, min(hi, at + step))
                    for at in range(lo, hi, step)
                ]
                pending.append((part, buffer, futures))
                queued += hi - lo
                stats.bytes += hi - lo
                stats.requests += len(futures)
                part = next(todo, None)
            if not pending:
                return
            done, buffer, futures = pending.popleft()
            for future in futures:
                future.result()
            queued -= _size(done)
            yield done, buffer
            del buffer  # the caller's now: not kept alive here while the next is read
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from None
    finally:
        for _, _, futures in pending:
            for future in futures:
                future.cancel()
        pool.shutdown(wait=True)
        reader.close()
