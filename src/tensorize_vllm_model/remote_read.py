"""Reading a remote tensors file (S3, HTTP) onto the CPU, and the checks a remote read gets.

A remote file is one `RangeStream` (parallel byte ranges, or one response) read in file
order. `read_stream` reads each tensor's header, checks it, then reads the tensor's bytes
straight into a new CPU tensor allocated by the calling thread (``readinto``: no
intermediate copy, no buffer from the reader threads' malloc arenas); an encrypted tensor is
decrypted chunk by chunk as it arrives (`tensor_decryption`), and with ``verify_hash`` each
tensor is checked against its stored hashes (`tensor_hashes`). Host memory is therefore the
tensors plus the stream's read-ahead window, and after the tensors are freed the process is
back where it started (README, Guarantees).

Where tensorizer's reader takes a remote file instead (GPU targets, settings only it
knows), its stream is wrapped in `HeaderGuard`, which checks each tensor header's length
field as it passes: tensorizer sizes a buffer by that field before it reads the header, so
a forged length is refused here, naming the tensor, before anything is allocated from it.
A local file gets the same check up front (`streaming._check_index`), where reading 8 bytes
per tensor is free.
"""

from __future__ import annotations

import bisect
import io
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import FormatError

__all__ = ["HEADER_LENGTH", "RemoteSpan", "check_header_length", "HeaderGuard", "read_stream"]

# Each tensor's header starts with its own length (tensorizer's `_TensorHeaderDeserializer`).
HEADER_LENGTH = struct.Struct("<Q")
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


def check_header_length(raw: bytes, room: int, tensor: str, uri: str) -> None:
    """Refuse a tensor header whose length field (`raw`, its 8 bytes) claims more than the
    `room` the index leaves for it, or nothing.

    Raises:
        FormatError: naming `uri` and `tensor`.
    """
    length = HEADER_LENGTH.unpack(raw)[0] if len(raw) == HEADER_LENGTH.size else -1
    if not 0 < length <= room:
        raise FormatError(
            f"{uri} is corrupt: the header of tensor {tensor} claims {length} "
            f"bytes where {room} are available"
        )


class HeaderGuard(io.RawIOBase):
    """`stream` as tensorizer reads it, with every tensor header's length field checked
    (`check_header_length`) in the read that delivers it, before the caller can use it.

    `fields` maps each header's offset to (tensor name, room). A read that covers only part
    of a field is not checked (tensorizer reads the field alone, in one read).
    """

    def __init__(self, stream: Any, fields: dict[int, tuple[str, int]], uri: str):
        super().__init__()
        self._stream = stream
        self._fields = fields
        self._offsets = sorted(fields)
        self._uri = uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def readinto(self, buffer: Any) -> int:
        start = self._stream.tell()
        count = self._stream.readinto(buffer)
        view = memoryview(buffer).cast("B")
        at = bisect.bisect_left(self._offsets, start)
        while at < len(self._offsets) and self._offsets[at] + HEADER_LENGTH.size <= start + count:
            offset = self._offsets[at]
            tensor, room = self._fields[offset]
            field = bytes(view[offset - start : offset - start + HEADER_LENGTH.size])
            check_header_length(field, room, tensor, self._uri)
            at += 1
        return count

    def close(self) -> None:
        self._stream.close()
        super().close()


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
            their shapes and dtypes (`streaming._check_index`).
        uri: the file's name in messages.
        index: the `TensorDeserializer` that read the file's index (with the key, for an
            encrypted file).
        encrypted: decrypt each tensor (its cipher is in its header).
        verify: check each tensor against the hashes in its header (`tensor_hashes`).

    Raises:
        FormatError: a header is forged or corrupt (naming the tensor), or the file ends
            before a tensor does.
        CorruptTensorError: a tensor fails its hash check (with `verify`).
        StorageError: the transfer fails.
        tensor_decryption.DecryptionFailed: an encrypted tensor fails its check.
    """
    from .local_read import _populate

    whole_header = encrypted or verify
    for span in sorted(spans, key=lambda s: s.entry.offset):
        entry = span.entry
        stream.seek(entry.offset)
        header = _read(stream, span.room if whole_header else HEADER_LENGTH.size, span, uri)
        check_header_length(header[: HEADER_LENGTH.size], span.room, span.name, uri)
        hashes = _parsed(_stored_hashes, header, index, span, uri) if verify else None
        size = math.prod(span.shape) * span.dtype.itemsize
        if entry.data_length == 0:  # stored without data: reads back as zeros
            if hashes:
                hashes.check(b"", tensor=span.name, uri=uri)
            yield span.name, torch.zeros(span.shape, dtype=span.dtype)
            continue
        cipher = _parsed(_cipher_of, header, index, span, uri) if encrypted else None
        memory = torch.empty(size, dtype=torch.uint8)
        _populate(memory.data_ptr(), size)
        view = memoryview(memory.numpy())
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


def _stored_hashes(entry: Any, header: bytes, index: Any) -> Any:
    from .tensor_hashes import stored_hashes

    return stored_hashes(header, index)


def _cipher_of(entry: Any, header: bytes, index: Any) -> Any:
    from .tensor_decryption import cipher_from_header

    return cipher_from_header(entry, header, index)


def _parsed(parse: Any, header: bytes, index: Any, span: RemoteSpan, uri: str) -> Any:
    """What `parse` reads from a tensor's header; a header it cannot read is corrupt."""
    try:
        return parse(span.entry, header, index)
    except Exception as e:  # noqa: BLE001 - tensorizer's parser rejects it one way or another
        raise FormatError(
            f"{uri} is corrupt: the header of tensor {span.name} cannot be "
            f"read ({type(e).__name__}: {e})"
        ) from None


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
