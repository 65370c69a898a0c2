"""Everything this package knows of tensorizer beyond its public API, in one place.

Two kinds of knowledge live here and nowhere else:

- tensorizer's private API (tensorizer 2.12): the index a `TensorDeserializer` read
  (``_metadata``), its per-tensor header parser (``_TensorHeaderDeserializer``), its key
  derivation (``_derive_encryption_key``) and its chunk cipher (``tensorizer._crypt``,
  ``tensorizer._crypt_info``). Our own readers need them to read, check and decrypt tensors
  without tensorizer's reader (`read.local`, `read.remote`, `read.decrypt`, `format.hashes`).
- the meaning of tensorizer's exceptions, some of which only their message tells apart:
  `ERROR_TABLE` maps each (exception type, message fragments) to this package's error
  (`errors`), applied by the one context manager `translate_errors`.

A tensorizer upgrade that changes either is fixed here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..core.errors import (
    CorruptTensorError,
    EncryptionError,
    FormatError,
    StorageError,
    TensorizeError,
    key_hint,
)

__all__ = [
    "ERROR_TABLE",
    "DecryptionFailed",
    "EmptyIndex",
    "translate_errors",
    "header_parse_errors",
    "wrong_key",
    "module_name",
    "index_items",
    "parse_tensor_header",
    "crypt_chunks",
    "decrypt_chunk",
]


class DecryptionFailed(Exception):
    """A cipher chunk failed its MAC check: a wrong key, or corrupted data."""


def wrong_key(uri: str, keyfile: str | None, tensor: str | None = None) -> EncryptionError:
    """The error of a key that does not decrypt `uri` (or of corrupted encrypted data), in
    `tensor` where it is known."""
    return EncryptionError(
        f"cannot decrypt {uri}"
        + (f" with the key in {keyfile}" if keyfile else "")
        + ": wrong key (or corrupted data)"
        + (f" in tensor {tensor}" if tensor else "")
    )


def module_name(name: str) -> str:
    """Tensorizer names tensors of the root module ``.name``; torch calls them ``name``."""
    return name[1:] if name.startswith(".") else name


# ---- tensorizer's exceptions -> ours ---------------------------------------------------

# Makes our error from (uri, keyfile, the exception); None re-raises tensorizer's own.
_Make = Callable[[str, "str | None", BaseException], "Exception | None"]


@dataclass(frozen=True)
class ErrorRule:
    """One row of `ERROR_TABLE`: an exception of `types` (tensorizer's, by name in
    ``tensorizer.serialization``, or Python's) whose message contains one of `fragments`
    (any message when empty) becomes `make(uri, keyfile, exception)`."""

    types: tuple[str | type[BaseException], ...]
    fragments: tuple[str, ...]
    make: _Make


def _needs_key(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return EncryptionError(f"{uri} is encrypted: {key_hint()}")


def _key_not_needed(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return EncryptionError(
        f"{uri} is not encrypted, but a key was given ({keyfile}); leave the key out"
    )


def _wrong_key(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return wrong_key(uri, keyfile)


def _hash_mismatch(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    found = re.search(r"Tensor '([^']*)'", str(e))
    tensor = module_name(found.group(1)) if found else "?"
    return CorruptTensorError(
        f"{uri}: tensor {tensor} failed its hash check (the data is corrupt)", tensor=tensor
    )


def _truncated(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return FormatError(f"{uri} is truncated or corrupt ({type(e).__name__}: {e})")


def _truncated_text(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return FormatError(f"{uri} is truncated or corrupt: {e}")


def _corrupt_text(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return FormatError(f"{uri} is corrupt: {e}")


def _unreadable(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return StorageError(f"cannot read {uri}: {e}")


def _own_error(uri: str, keyfile: str | None, e: BaseException) -> None:
    return None  # not the file's fault (a device too small): tensorizer's error stands


def _corrupt(uri: str, keyfile: str | None, e: BaseException) -> Exception:
    return FormatError(f"{uri} is corrupt ({type(e).__name__}: {e})")


# First matching row wins (tensorizer 2.12's exceptions and messages).
ERROR_TABLE: tuple[ErrorRule, ...] = (
    ErrorRule(("CryptographyError",), ("decryption was not requested",), _needs_key),
    ErrorRule(
        ("CryptographyError",),
        ("not flagged as encrypted", "predating encryption"),
        _key_not_needed,
    ),
    ErrorRule(("CryptographyError",), (), _wrong_key),
    ErrorRule(("HashMismatchError",), (), _hash_mismatch),
    ErrorRule((struct.error, EOFError, AssertionError), (), _truncated),
    # read_preamble refuses empty and non-tensorizer files with a ValueError.
    ErrorRule((ValueError,), ("too small", "empty", "Unsupported version"), _truncated_text),
    ErrorRule((ValueError,), (), _corrupt_text),
    ErrorRule((OSError,), (), _unreadable),
    ErrorRule((RuntimeError,), ("out of memory",), _own_error),
    ErrorRule(
        (KeyError, IndexError, TypeError, OverflowError, MemoryError, RuntimeError), (), _corrupt
    ),
)


@functools.cache
def _resolved(rule: ErrorRule) -> tuple[type[BaseException], ...]:
    import tensorizer.serialization

    return tuple(
        getattr(tensorizer.serialization, t) if isinstance(t, str) else t for t in rule.types
    )


def _translated(e: BaseException, uri: str, keyfile: str | None) -> Exception | None:
    """Our error for tensorizer's `e` (None: `e` stands), by `ERROR_TABLE`."""
    text = str(e)
    for rule in ERROR_TABLE:
        if isinstance(e, _resolved(rule)) and (
            not rule.fragments or any(f in text for f in rule.fragments)
        ):
            return rule.make(uri, keyfile, e)
    return None


@contextlib.contextmanager
def translate_errors(uri: str, *, keyfile: str | None = None) -> Iterator[None]:
    """Turn tensorizer's exceptions raised inside into this package's (`ERROR_TABLE`),
    naming the file `uri` (and `keyfile`, for a wrong key). Our own errors pass through."""
    try:
        yield
    except TensorizeError:
        raise
    except Exception as e:
        ours = _translated(e, uri, keyfile)
        if ours is None:
            raise
        raise ours from None


@contextlib.contextmanager
def header_parse_errors(uri: str, tensor: str) -> Iterator[None]:
    """A tensor header tensorizer's parser rejects (whatever it raises) is corrupt.

    Raises:
        FormatError: naming `uri` and `tensor`.
    """
    try:
        yield
    except TensorizeError:
        raise
    except Exception as e:  # noqa: BLE001 - tensorizer's parser rejects it one way or another
        raise FormatError(
            f"{uri} is corrupt: the header of tensor {tensor} cannot be "
            f"read ({type(e).__name__}: {e})"
        ) from None


# ---- tensorizer's private API ------------------------------------------------------------


class EmptyIndex:
    """The index of a valid tensorizer file that holds no tensors (tensorizer's reader
    refuses to open one: "Tensor index in the file is empty")."""

    _metadata: dict = {}

    def __contains__(self, name: object) -> bool:
        return False

    def close(self) -> None:
        pass


def index_items(deserializer: Any) -> Iterator[tuple[str, Any]]:
    """(tensorizer's name, index entry) of every tensor `deserializer` indexed, in file
    order, the reserved record and marker included. An entry has ``offset`` (of the
    tensor's header), ``data_offset``, ``data_length``, ``deserialized_length``, ``dtype``
    (numpy's name, then tensorizer's separator and torch's), ``shape`` and ``type``."""
    for path, entry in deserializer._metadata.items():
        yield (path[0] if isinstance(path, tuple) and len(path) == 1 else str(path)), entry


def parse_tensor_header(
    raw: bytes, deserializer: Any, *, zero_hashes: bool, check_crypt_info: bool | None = None
) -> Any:
    """tensorizer's parse of one tensor header `raw` (the file's bytes from the index entry's
    ``offset`` to its ``data_offset``), read with the settings of `deserializer` (the
    `TensorDeserializer` that read the index): ``.hashes``, ``.compute_hashes()``
    (with `zero_hashes`), ``.crypt_info`` (read when `check_crypt_info`; by default, when
    the file has crypt info).

    Raises:
        Exception: the header cannot be parsed (tensorizer's parser decides which).
    """
    from tensorizer.serialization import _TensorHeaderDeserializer

    return _TensorHeaderDeserializer(
        bytearray(raw),
        zero_hashes=zero_hashes,
        check_crypt_info=(
            bool(getattr(deserializer, "_has_crypt_info", False))
            if check_crypt_info is None
            else check_crypt_info
        ),
        long_shape_tensors=getattr(deserializer, "_long_shape_tensors", frozenset()),
    )


class UnexpectedCipher(Exception):
    """A tensor header this package does not know how to decrypt by chunks."""


def crypt_chunks(
    entry: Any, raw: bytes, deserializer: Any
) -> tuple[bytes, int, tuple[bytes, ...], tuple[bytes, ...]] | None:
    """How one tensor is encrypted, from its header `raw`: (key, chunk size, each chunk's
    nonce, each chunk's MAC); None for a tensor stored without data. Tensorizer encrypts
    with XSalsa20-Poly1305 in chunks, nonces counted up from the first.

    Raises:
        Exception: the header is not as expected (tensorizer's parser, or `UnexpectedCipher`).
    """
    from tensorizer import _crypt, _crypt_info

    info = parse_tensor_header(
        raw, deserializer, zero_hashes=False, check_crypt_info=True
    ).crypt_info
    if entry.data_length == 0:
        return None
    if info is None or info.num_chunks == 0:
        raise UnexpectedCipher
    methods = info.find_chunks(
        (_crypt_info.XSalsa20ParallelChunk, _crypt_info.XSalsa20SequentialChunk)
    )
    if len(methods) != 1:
        raise UnexpectedCipher
    method = methods[0]
    key = bytes(deserializer._derive_encryption_key(info))
    sequential = isinstance(method, _crypt_info.XSalsa20SequentialChunk)
    macs = [method.mac] if sequential else list(method.macs)
    if len(macs) == 1:  # the whole tensor is one chunk
        return key, entry.data_length, (bytes(method.nonce),), (bytes(macs[0]),)
    if len(macs) != math.ceil(entry.data_length / method.chunk_size):
        raise UnexpectedCipher
    nonces = _crypt.ChunkedEncryption.sequential_nonces(bytes(method.nonce), len(macs))
    return key, method.chunk_size, tuple(bytes(n) for n in nonces), tuple(bytes(m) for m in macs)


def decrypt_chunk(key: bytes, buffer: memoryview, nonce: bytes, mac: bytes) -> None:
    """Check and decrypt one chunk in place with tensorizer's libsodium bindings.

    Raises:
        DecryptionFailed: its MAC does not match (wrong key or corrupted data).
    """
    from tensorizer import _crypt

    try:
        with _crypt.SequentialEncryption(
            key=key,
            buffer=buffer,
            nonce=nonce,
            mac=mac,
            intent=_crypt.SequentialEncryption.INTENT.DECRYPTION,
        ) as chunk:
            chunk.decrypt()
    except _crypt.CryptographyError:
        raise DecryptionFailed("a chunk failed its check") from None


# ---- the index's reserved room, and zero-element tensors ---------------------------------

# tensorizer 2.12's TensorSerializer reserves a fixed 256 KiB for the index (about 2,600
# entries, then "Metadata overflow"); the file says how large it is (a uint64 before it), so
# readers take any size.
DEFAULT_INDEX_BYTES = 256 * 1024
# One index entry (tensorizer 2.12, ``_TensorHeaderSerializer.metadata_entry_segment``):
# name length (2) + name + type (1) + dtype length (1) + dtype + rank (1) + shape (8 per
# dimension at most) + three offsets (24); and up to 8 bytes of version tag per entry.
_ENTRY_FIXED_BYTES = 2 + 1 + 1 + 1 + 24 + 8
MAX_NAME_BYTES = 0xFFFF  # the name length is a uint16
MAX_DTYPE_BYTES = 0xFF  # the dtype length and the rank are uint8
MAX_DIMENSIONS = 0xFF


def index_entry_bytes(name: str, dtype_name_bytes: int, dimensions: int) -> int:
    """An upper bound on the bytes tensorizer 2.12's index takes for one tensor named
    `name` (UTF-8), whose dtype string is `dtype_name_bytes` long, with `dimensions`."""
    return _ENTRY_FIXED_BYTES + len(name.encode()) + dtype_name_bytes + 8 * dimensions


def reserve_index(serializer: Any, size: int) -> None:
    """Make a new tensorizer 2.12 ``TensorSerializer``'s index room `size` bytes (nothing
    if 256 KiB, its own reservation, is enough). Must be called before the first tensor is
    written: the room is the zero bytes its ``__init__`` wrote last, grown in place, and
    its size field (the uint64 before it) rewritten.

    Raises:
        RuntimeError: the serializer is not in that state (a tensorizer that lays its
            header out otherwise: checked here, on upgrade).
    """
    metadata_loc = serializer._metadata_loc
    old_end = serializer._metadata_end
    if size <= old_end - metadata_loc:
        return
    f = serializer._file
    if f.tell() != old_end or serializer._file_header.tensor_count:
        raise RuntimeError("reserve_index: the serializer has already written tensors")
    serializer._pwrite(struct.pack("<Q", size), metadata_loc - 8, 8)
    remaining = size - (old_end - metadata_loc)
    zeros = bytes(min(remaining, 1 << 20))
    while remaining:
        remaining -= f.write(zeros[: min(remaining, len(zeros))])
    serializer._flush()
    serializer._metadata_end = metadata_loc + size


def _deserialized_length(entry: Any) -> int:
    """`TensorEntry.deserialized_length` of tensorizer 2.12, for every dtype: its own calls
    ``numpy.dtype`` on the whole dtype string of a zero-length entry, which fails for the
    dtypes numpy lacks (bfloat16, float8: ``'<V2\\x00torch.bfloat16'``), so no reader
    opened a file holding an empty tensor of those; here numpy gets its own part."""
    if entry.data_length > 0:  # first: asked 4 times per entry when a file opens
        return int(entry.data_length)
    import numpy
    from tensorizer.serialization import OPAQUE_DTYPE_SEP

    itemsize = numpy.dtype(entry.dtype.split(OPAQUE_DTYPE_SEP)[0]).itemsize
    return itemsize * math.prod(entry.shape)


def _fix_zero_length_entries() -> None:
    """Install `_deserialized_length` on tensorizer's ``TensorEntry`` (a fix of a
    tensorizer 2.12.1 bug; the same answer for every entry its own could read)."""
    try:
        from tensorizer.serialization import TensorEntry
    except ImportError:  # pragma: no cover - tensorizer is a dependency
        return
    TensorEntry.deserialized_length = property(_deserialized_length)


_fix_zero_length_entries()
