"""The checks every tensor gets on its way in, whichever engine reads it (`read.local`,
`read.remote`, `read.ranges`, `read.partial`), each written once:

- the file ends before a tensor does (it changed after its index was checked): `truncated`,
  and the one loop that reads a view whole or says so (`fill`);
- a tensor header whose length field claims more than the index leaves for it
  (`header_length`), and one tensorizer's parser rejects: `stored_hashes` and `cipher_of`
  parse a header's hashes and cipher under `format.compat.header_parse_errors`;
- a cipher chunk that fails its MAC: `wrong_key_errors` turns it into the one wrong-key
  error of `format.compat.wrong_key`.

The hash check itself is `format.hashes.StoredHashes.check`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..core.errors import FormatError
from ..format.compat import DecryptionFailed, header_parse_errors, wrong_key
from ..format.header import HEADER_LENGTH, check_header_length

if TYPE_CHECKING:
    from ..format.hashes import StoredHashes
    from .decrypt import TensorCipher

__all__ = [
    "truncated",
    "fill",
    "header_length",
    "stored_hashes",
    "cipher_of",
    "wrong_key_errors",
]


def truncated(uri: str, tensor: str, size: int | None = None) -> FormatError:
    """The error of a file that ends before `tensor`'s bytes do (`size`: its length now,
    when known)."""
    now = f" ({size} bytes now)" if size is not None else ""
    return FormatError(f"{uri} is truncated: tensor {tensor} ends past the end of the file{now}")


def fill(
    read: Callable[[memoryview, int], int], view: memoryview, offset: int, uri: str, tensor: str
) -> None:
    """Fill `view` with the file's bytes from `offset` on, by ``read(part of view, its
    offset) -> bytes read`` (0 at the end of the file) until it is full.

    Raises:
        FormatError: the file ends first (`truncated`, naming `uri` and `tensor`).
    """
    got = 0
    while got < len(view):
        count = read(view[got:], offset + got)
        if not count:
            raise truncated(uri, tensor)
        got += count


def header_length(raw: bytes, room: int, uri: str, tensor: str) -> None:
    """Refuse `tensor`'s header `raw` (at least its first 8 bytes) when its length field
    claims more than the `room` the index leaves for it (`format.header.check_header_length`:
    checked before anything is sized by it).

    Raises:
        FormatError: naming `uri` and `tensor`.
    """
    check_header_length(raw[: HEADER_LENGTH.size], room, tensor, uri)


def stored_hashes(raw: bytes, index: Any, uri: str, tensor: str) -> StoredHashes:
    """The hashes stored in `tensor`'s header `raw` (`format.hashes.stored_hashes`);
    `index` is the `TensorDeserializer` that read the file's index.

    Raises:
        FormatError: the header cannot be parsed (naming `uri` and `tensor`).
    """
    from ..format.hashes import stored_hashes as parse

    with header_parse_errors(uri, tensor):
        return parse(raw, index)


def cipher_of(entry: Any, raw: bytes, index: Any, uri: str, tensor: str) -> TensorCipher | None:
    """The cipher of `tensor` from its header `raw` (`read.decrypt.cipher_from_header`);
    None for a tensor stored without data.

    Raises:
        FormatError: the header cannot be parsed (naming `uri` and `tensor`).
    """
    from .decrypt import cipher_from_header

    with header_parse_errors(uri, tensor):
        return cipher_from_header(entry, raw, index)


@contextlib.contextmanager
def wrong_key_errors(
    uri: str, keyfile: str | None = None, tensor: str | None = None
) -> Iterator[None]:
    """A cipher chunk that fails its check inside is the key's fault (or corrupted data).

    Raises:
        EncryptionError: `format.compat.wrong_key`, naming `uri` (and `keyfile`, `tensor`
            where given; never the key).
    """
    try:
        yield
    except DecryptionFailed:
        raise wrong_key(uri, keyfile, tensor) from None
