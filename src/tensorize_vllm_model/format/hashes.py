"""Checking a tensor against the hashes stored in its header (``verify_hash``), in our own
readers (`read.local`, `read.remote`).

Tensorizer stores a CRC32 and a SHA-256 of each tensor: of its header (with the hash fields
zeroed, and an encrypted file's crypt info left out) followed by its plaintext data. Our
readers read the header's bytes, read (and decrypt) the data into the new tensor, then check
it here in the loading thread, the way tensorizer's `_verify_hashes` does. Tensorizer's
reader allocates each tensor in a thread of its own pool, where freed tensors stayed in
that thread's malloc arena (a 128 MiB local load with hash checks kept all 128 MiB resident
after the tensors were freed, in some runs); ours allocate in the loading thread.

The header parser is tensorizer's (not public API: reached through `format.compat`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

from tensorizer.serialization import HashType

from ..core.errors import CorruptTensorError
from .compat import parse_tensor_header

__all__ = ["StoredHashes", "stored_hashes"]


@dataclass
class StoredHashes:
    """One tensor's stored hashes, and the hashes of its header computed so far."""

    hashes: list[Any]  # tensorizer's TensorHash entries
    header: dict[Any, Any]  # HashType -> the header's CRC32 value or SHA-256 object

    def check(self, data: Any, *, tensor: str, uri: str) -> None:
        """Check the tensor's data (its plaintext; empty for a tensor stored without data).

        Raises:
            CorruptTensorError: a hash does not match, naming `uri` and `tensor`.
        """
        for stored in self.hashes:
            if stored.type == HashType.CRC32:
                good = (
                    zlib.crc32(data, self.header[HashType.CRC32])
                    == struct.unpack("<I", stored.hash)[0]
                )
            elif stored.type == HashType.SHA256:
                digest = self.header[HashType.SHA256].copy()
                digest.update(data)
                good = digest.digest() == stored.hash
            else:
                good = False
            if not good:
                raise CorruptTensorError(
                    f"{uri}: tensor {tensor} failed its hash check (the data is corrupt)",
                    tensor=tensor,
                )


def stored_hashes(raw: bytes, deserializer: Any) -> StoredHashes:
    """The hashes stored in one tensor header, `raw` (the file's bytes from the index
    entry's ``offset`` to its ``data_offset``); `deserializer` is the `TensorDeserializer`
    that read the index.

    Raises:
        Exception: the header cannot be parsed (tensorizer's parser decides which).
    """
    header = parse_tensor_header(raw, deserializer, zero_hashes=True)
    return StoredHashes(hashes=list(header.hashes), header=header.compute_hashes())
