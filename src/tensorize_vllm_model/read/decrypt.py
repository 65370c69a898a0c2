"""Decrypting an encrypted file's tensors as our own reader threads read them (`read.local`,
`read.remote`).

Tensorizer encrypts each tensor with XSalsa20-Poly1305 (libsodium) in chunks of a fixed size
(2 MiB as it writes them); each chunk has its own nonce (the tensor's first nonce counted up)
and its own MAC, all kept in the tensor's header. A chunk can therefore be checked and
decrypted alone, as soon as its bytes are in: the reading thread does it right after the read,
while the other threads read on. Through tensorizer's reader, which decrypts in a pool after
its own reads, an encrypted load ran at 42% of a plain one (round 1:
docs/archive/performance-rounds.md).

The cipher is tensorizer's own (its libsodium bindings); only the chunk bookkeeping is here.
Tensorizer's per-tensor headers and crypt info are not public API: they are read through
`format.compat`. An unexpected layout makes `ciphers` answer None, and tensorizer's reader
then takes the file, as before.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..format.compat import DecryptionFailed, crypt_chunks, decrypt_chunk
from ..format.header import pread_each

__all__ = ["DecryptionFailed", "TensorCipher", "ciphers", "cipher_from_header"]


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
            decrypt_chunk(
                self.key, view[at : at + self.chunk_size], self.nonces[index], self.macs[index]
            )


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
    chunks = crypt_chunks(entry, raw, deserializer)
    return None if chunks is None else TensorCipher(*chunks)
