"""Encryption keys: generate, write (mode 0600), read and check them.

A tensorizer key is 32 random bytes (XSalsa20-Poly1305 through libsodium). Keys are never
logged or put in exception messages; errors name the key *file*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import storage
from .errors import EncryptionError, TensorizeError

if TYPE_CHECKING:
    from .config import TensorizerConfig

__all__ = ["KEY_BYTES", "generate_key", "stage_key", "read_key", "read_decryption_params",
           "encryption_params"]

KEY_BYTES = 32


def generate_key() -> bytes:
    """32 random bytes from libsodium's generator (through tensorizer)."""
    from tensorizer import EncryptionParams

    return bytes(EncryptionParams.random().key)


def stage_key(uri: str, key: bytes, options: storage.Options = None) -> storage.StagedWrite:
    """Write `key` to a temporary file (mode 0600) that `commit()` publishes at `uri`
    (a local path or an ``s3://`` URI)."""
    staged = storage.stage_write(uri, options, mode=0o600)
    try:
        with open(staged.path, "wb") as f:
            f.write(key)
    except BaseException:
        staged.abort()
        raise
    return staged


def read_key(uri: str, config: TensorizerConfig | None = None) -> bytes:
    """Read and check the key in `uri`.

    Raises:
        EncryptionError: the file is missing, unreadable or not a 32-byte key.
    """
    options = config.stream_options() if config is not None else None
    try:
        key = storage.read_bytes(uri, options, limit=KEY_BYTES)
    except TensorizeError as e:
        raise EncryptionError(f"cannot read the key file {uri}: {e}") from None
    if len(key) != KEY_BYTES:
        raise EncryptionError(
            f"the key file {uri} holds {len(key)} bytes; a tensorizer key is exactly "
            f"{KEY_BYTES} bytes (as written by `serialize --keyfile`)"
        )
    return key


def read_decryption_params(uri: str, config: TensorizerConfig | None = None):
    """Tensorizer's `DecryptionParams` for the key in `uri`."""
    from tensorizer import DecryptionParams

    return DecryptionParams.from_key(read_key(uri, config))


def encryption_params(key: bytes):
    """Tensorizer's `EncryptionParams` for a 32-byte key."""
    from tensorizer import EncryptionParams

    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise EncryptionError(f"an encryption key must be {KEY_BYTES} bytes")
    return EncryptionParams(key=bytes(key))
