"""Reading a remote tensors file (S3, HTTP) onto the CPU, and the checks a remote read gets.

A file read by byte ranges (the default) is read by `read.ranges.RangedRead`: parallel
ranged requests straight into the tensors' memory, each byte landing once. A file read as
one response (``stream_kwargs={"ranges": false}``, or a server without byte ranges) is
one `RangeStream` read in file order by `read_stream`: it reads each tensor's header,
checks it, then reads the tensor's bytes straight into a new CPU tensor allocated by the
calling thread (``readinto``: no intermediate copy, no buffer from the reader threads'
malloc arenas). Both decrypt an encrypted tensor chunk by chunk as it arrives
(`read.decrypt`) and, with ``verify_hash``, check each tensor against its stored hashes
(`format.hashes`). Host memory is therefore the tensors plus a read-ahead window, and
after the tensors are freed the process is back where it started (README, Guarantees).

Where tensorizer's reader takes a remote file instead (GPU targets, settings only it
knows), its stream is wrapped in `format.header.HeaderGuard`, which checks each tensor header's length
field as it passes: tensorizer sizes a buffer by that field before it reads the header, so
a forged length is refused here, naming the tensor, before anything is allocated from it.
A local file gets the same check up front (`format.header.check_index`), where reading 8 bytes
per tensor is free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..format.header import HEADER_LENGTH, torch_dtype
from ..storage.ranged import RangeStream
from .base import OpenFile, ReadTimes
from .checks import cipher_of, header_length, stored_hashes, wrong_key_errors
from .memory import byte_view, fresh_bytes
from .source import ByteSource, RemoteSource, StreamSource

__all__ = ["RemoteEngine", "RemoteSpan", "read_stream"]

_PIECE = 16 << 20  # bytes per readinto of a plain tensor


@dataclass(frozen=True)
class RemoteSpan:
    """One tensor as the index places it: header at `offset`, data at `data_offset`."""

    name: str
    entry: Any  # tensorizer's index entry
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def room(self) -> int:
        """Bytes the index leaves for the tensor's header."""
        return self.entry.data_offset - self.entry.offset


def read_stream(
    stream: Any,
    spans: Sequence[RemoteSpan],
    *,
    uri: str,
    index: Any,
    encrypted: bool = False,
    verify: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Read each span's tensor from `stream` onto the CPU, in file order, and yield it.

    Args:
        stream: the remote file, seekable (`storage.open_read`).
        spans: the tensors to read; their sizes were checked against the file's length and
            their shapes and dtypes (`format.header.check_index`).
        uri: the file's name in messages.
        index: the `TensorDeserializer` that read the file's index (with the key, for an
            encrypted file).
        encrypted: decrypt each tensor (its cipher is in its header).
        verify: check each tensor against the hashes in its header (`format.hashes`).

    Raises:
        FormatError: a header is forged or corrupt (naming the tensor), or the file ends
            before a tensor does.
        CorruptTensorError: a tensor fails its hash check (with `verify`).
        StorageError: the transfer fails.
        format.compat.DecryptionFailed: an encrypted tensor fails its check.
    """
    whole_header = encrypted or verify
    source = StreamSource(stream, uri)
    for span in sorted(spans, key=lambda s: s.entry.offset):
        entry = span.entry
        header = _read(source, span, span.room if whole_header else HEADER_LENGTH.size)
        header_length(header, span.room, uri, span.name)
        hashes = stored_hashes(header, index, uri, span.name) if verify else None
        size = math.prod(span.shape) * span.dtype.itemsize
        if entry.data_length == 0:  # stored without data: reads back as zeros
            if hashes:
                hashes.check(b"", tensor=span.name, uri=uri)
            yield span.name, torch.zeros(span.shape, dtype=span.dtype)
            continue
        cipher = cipher_of(entry, header, index, uri, span.name) if encrypted else None
        memory = fresh_bytes(size)
        view = byte_view(memory)
        step = cipher.chunk_size if cipher else _PIECE
        for start in range(0, size, step):
            piece = view[start : start + step]
            source.read_into(entry.data_offset + start, piece, span.name)
            if cipher:
                cipher.decrypt(piece, start)
        if hashes:
            hashes.check(view, tensor=span.name, uri=uri)
        del view
        yield span.name, memory.view(span.dtype).reshape(span.shape)


def _read(source: ByteSource, span: RemoteSpan, count: int) -> bytes:
    """The first `count` bytes of `span`'s header."""
    data = bytearray(count)
    source.read_into(span.entry.offset, memoryview(data), span.name)
    return bytes(data)


class RemoteEngine:
    """A remote file read into CPU memory (`read.ranges`, or `read_stream` for one
    response); a dtype torch lacks sends the file to tensorizer's reader
    (`read.tensorizer`)."""

    read_times: ReadTimes | None = None

    def items(
        self,
        file: OpenFile,
        chosen: list[tuple[str, Any]],
        on_bytes: Callable[[int], None] | None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        spans = []
        for name, entry in chosen:
            dtype = torch_dtype(entry.dtype)
            if dtype is None:  # numpy-only dtype: tensorizer reads it
                from .tensorizer import TensorizerEngine

                yield from TensorizerEngine(remote=True).items(file, chosen, on_bytes)
                return
            shape = tuple(int(d) for d in entry.shape)
            spans.append(RemoteSpan(name=name, entry=entry, dtype=dtype, shape=shape))
        stream = file.reopen()
        try:
            with wrong_key_errors(file.name, file.request.keyfile):
                for name, tensor in _tensors(stream, spans, file):
                    if on_bytes is not None:
                        on_bytes(tensor.numel() * tensor.element_size())
                    yield name, tensor
        finally:
            stream.close()


def _tensors(stream: Any, spans: list[RemoteSpan], file: OpenFile) -> Iterator[tuple[str, Any]]:
    """The tensors of `spans`: by parallel ranged requests straight into their memory
    (`read.ranges`) where the file is read by byte ranges, else from the one response."""
    uri, index = file.name, file.header
    encrypted, verify = file.facts.encrypted, bool(file.kwargs["verify_hash"])
    if isinstance(stream, RangeStream) and not stream.one_response:
        from .ranges import RangedRead

        return RangedRead(
            RemoteSource(stream.source),
            spans,
            uri=uri,
            index=index,
            encrypted=encrypted,
            verify=verify,
            chunk_size=stream.chunk_size,
            workers=stream.workers,
        ).tensors()
    return read_stream(stream, spans, uri=uri, index=index, encrypted=encrypted, verify=verify)
