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

from ..core.errors import FormatError
from ..format.compat import DecryptionFailed, header_parse_errors, wrong_key
from ..format.header import HEADER_LENGTH, check_header_length, torch_dtype
from ..storage.ranged import RangeStream
from .base import OpenFile, ReadTimes
from .local import byte_view, populate

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
    for span in sorted(spans, key=lambda s: s.entry.offset):
        entry = span.entry
        stream.seek(entry.offset)
        header = _read(stream, span.room if whole_header else HEADER_LENGTH.size, span, uri)
        check_header_length(header[: HEADER_LENGTH.size], span.room, span.name, uri)
        hashes = _stored_hashes(header, index, span, uri) if verify else None
        size = math.prod(span.shape) * span.dtype.itemsize
        if entry.data_length == 0:  # stored without data: reads back as zeros
            if hashes:
                hashes.check(b"", tensor=span.name, uri=uri)
            yield span.name, torch.zeros(span.shape, dtype=span.dtype)
            continue
        cipher = _cipher_of(header, index, span, uri) if encrypted else None
        memory = torch.empty(size, dtype=torch.uint8)
        populate(memory.data_ptr(), size)
        view = byte_view(memory)
        stream.seek(entry.data_offset)
        step = cipher.chunk_size if cipher else _PIECE
        for start in range(0, size, step):
            piece = view[start : start + step]
            _read_into(stream, piece, span, uri)
            if cipher:
                cipher.decrypt(piece, start)
        if hashes:
            hashes.check(view, tensor=span.name, uri=uri)
        del view
        yield span.name, memory.view(span.dtype).reshape(span.shape)


def _stored_hashes(header: bytes, index: Any, span: RemoteSpan, uri: str) -> Any:
    from ..format.hashes import stored_hashes

    with header_parse_errors(uri, span.name):
        return stored_hashes(header, index)


def _cipher_of(header: bytes, index: Any, span: RemoteSpan, uri: str) -> Any:
    from .decrypt import cipher_from_header

    with header_parse_errors(uri, span.name):
        return cipher_from_header(span.entry, header, index)


def _read(stream: Any, count: int, span: RemoteSpan, uri: str) -> bytes:
    data = bytearray(count)
    _read_into(stream, memoryview(data), span, uri)
    return bytes(data)


def _read_into(stream: Any, view: memoryview, span: RemoteSpan, uri: str) -> None:
    got = 0
    while got < len(view):
        count = stream.readinto(view[got:])
        if not count:
            raise FormatError(
                f"{uri} is truncated: tensor {span.name} ends past the end of the file"
            )
        got += count


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
            for name, tensor in _tensors(stream, spans, file):
                if on_bytes is not None:
                    on_bytes(tensor.numel() * tensor.element_size())
                yield name, tensor
        except DecryptionFailed:
            raise wrong_key(file.name, file.request.keyfile) from None
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
            stream.source,
            spans,
            uri=uri,
            index=index,
            encrypted=encrypted,
            verify=verify,
            chunk_size=stream.chunk_size,
            workers=stream.workers,
        ).tensors()
    return read_stream(stream, spans, uri=uri, index=index, encrypted=encrypted, verify=verify)
