"""Decrypting an encrypted file's tensors as our own reader threads read them (`local_read`).

Tensorizer encrypts each tensor with XSalsa20-Poly1305 (libsodium) in chunks of a fixed size
(2 MiB as it writes them); each chunk has its own nonce (the tensor's first nonce counted up)
and its own MAC, all kept in the tensor's header. A chunk can therefore be checked and
decrypted alone, as soon as its bytes are in: the reading thread does it right after the read,
while the other threads read on. Through tensorizer's reader, which decrypts in a pool after
its own reads, an encrypted load ran at 42% of a plain one (README, Performance).

The cipher is tensorizer's own (its libsodium bindings); only the chunk bookkeeping is here.
This is the one module that reads tensorizer's per-tensor headers and crypt info, which are
not public API: an unexpected layout makes `ciphers` answer None, and tensorizer's reader then
takes the file, as before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tensorizer import _crypt, _crypt_info
from tensorizer.serialization import _TensorHeaderDeserializer

from .local_read import pread_each

__all__ = ["DecryptionFailed", "TensorCipher", "ciphers", "cipher_from_header"]


class DecryptionFailed(Exception):
    """A chunk failed its MAC check: a wrong key, or corrupted data."""


@dataclass(frozen=True)
class TensorCipher:
    """How one tensor's bytes are encrypted: in chunks of `chunk_size` bytes (the last one
    shorter), chunk i with `nonces[i]` and `macs[i]`."""

    key: bytes = field(repr=False)  # never shown, in logs or errors
    chunk_size: int
    nonces: tuple[bytes, ...]
    macs: tuple[bytes, ...]

    def decrypt(self, view: memoryview, start: int) -> None:
        """Check and decrypt, in place, the tensor's bytes from `start` held in `view`: they
        begin on a chunk boundary and end on one or at the tensor's end.

        Raises:
            DecryptionFailed: a chunk's MAC does not match (wrong key or corrupted data).
        """
        first = start // self.chunk_size
        for index in range(first, first + math.ceil(len(view) / self.chunk_size)):
            at = (index - first) * self.chunk_size
            try:
                with _crypt.SequentialEncryption(
                    key=self.key,
                    buffer=view[at : at + self.chunk_size],
                    nonce=self.nonces[index],
                    mac=self.macs[index],
                    intent=_crypt.SequentialEncryption.INTENT.DECRYPTION,
                ) as chunk:
                    chunk.decrypt()
            except _crypt.CryptographyError:
                raise DecryptionFailed(f"chunk {index} failed its check") from None


def ciphers(
    path: str, entries: Sequence[Any], deserializer: Any
) -> list[TensorCipher | None] | None:
    """Each entry's cipher (None for a tensor stored without data), read from the tensor
    headers of the local file at `path`; `entries` are tensorizer's index entries and
    `deserializer` the `TensorDeserializer` that read them, with the key. None when a header
    is not as expected (tensorizer's own reader is then used)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            raws = pread_each(fd, [(e.offset, e.data_offset - e.offset) for e in entries])
        finally:
            os.close(fd)
        return [cipher_from_header(entry, raw, deserializer) for entry, raw in zip(entries, raws)]
    except Exception:  # noqa: BLE001 - an unexpected header: tensorizer's reader decides
        return None


def cipher_from_header(entry: Any, raw: bytes, deserializer: Any) -> TensorCipher | None:
    """The cipher of one tensor from its header's bytes `raw` (the file's bytes from
    ``entry.offset`` to ``entry.data_offset``); None for a tensor stored without data.

    Raises:
        Exception: the header is not as expected (tensorizer's parser decides which).
    """
    header = _TensorHeaderDeserializer(
        bytearray(raw),
        zero_hashes=False,
        check_crypt_info=True,
        long_shape_tensors=getattr(deserializer, "_long_shape_tensors", frozenset()),
    )
    return _cipher(entry, header.crypt_info, deserializer)


class _Unexpected(Exception):
    """A tensor header this module does not know how to decrypt by chunks."""


def _cipher(entry: Any, info: Any, deserializer: Any) -> TensorCipher | None:
    if entry.data_length == 0:
        return None
    if info is None or info.num_chunks == 0:
        raise _Unexpected
    methods = info.find_chunks(
        (_crypt_info.XSalsa20ParallelChunk, _crypt_info.XSalsa20SequentialChunk)
    )
    if len(methods) != 1:
        raise _Unexpected
    method = methods[0]
    key = bytes(deserializer._derive_encryption_key(info))
    macs = (
        [method.mac]
        if isinstance(method, _crypt_info.XSalsa20SequentialChunk)
        else list(method.macs)
    )
    if len(macs) == 1:  # the whole tensor is one chunk
        return TensorCipher(key, entry.data_length, (bytes(method.nonce),), (bytes(macs[0]),))
    if len(macs) != math.ceil(entry.data_length / method.chunk_size):
        raise _Unexpected
    nonces = _crypt.ChunkedEncryption.sequential_nonces(bytes(method.nonce), len(macs))
    return TensorCipher(
        key, method.chunk_size, tuple(bytes(n) for n in nonces), tuple(bytes(m) for m in macs)
    )
