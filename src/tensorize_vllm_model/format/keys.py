"""Encryption keys: generate, write (mode 0600), read and check them.

A tensorizer key is 32 random bytes (XSalsa20-Poly1305 through libsodium). Keys are never
logged or put in exception messages; errors name the key *file*. A key file is never
overwritten: a serialize given a key file that exists encrypts with the key it holds, and a
new key is written only where no file is (see `prepare_key`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import storage
from ..core.errors import EncryptionError, TensorizeError

if TYPE_CHECKING:
    from ..config import TensorizerConfig

__all__ = [
    "KEY_BYTES",
    "generate_key",
    "stage_key",
    "write_key",
    "read_key",
    "read_decryption_params",
    "encryption_params",
    "EncryptionKey",
    "prepare_key",
]

KEY_BYTES = 32


def generate_key() -> bytes:
    """32 random bytes from libsodium's generator (through tensorizer)."""
    from tensorizer import EncryptionParams

    return bytes(EncryptionParams.random().key)


def stage_key(tx: storage.Transaction, uri: str, key: bytes) -> storage.StagedWrite:
    """Write `key` to a temporary file (mode 0600) that transaction `tx` publishes at `uri`
    (a local path or an ``s3://`` URI). Publishing never replaces a file at `uri`: it raises
    `AlreadyExists` naming it instead (and the transaction rolls back)."""
    staged = tx.stage(uri, mode=0o600, replace=False)
    with open(staged.path, "wb") as f:
        f.write(key)
    return staged


def write_key(uri: str, key: bytes, options: storage.Options = None) -> None:
    """Publish `key` at `uri` now (mode 0600), never over an existing file.

    Raises:
        AlreadyExists: a file is at `uri` (left as it is).
        StorageError: it cannot be written.
    """
    with storage.transaction(options) as tx:
        stage_key(tx, uri, key)


def read_key(uri: str, config: TensorizerConfig | None = None) -> bytes:
    """Read and check the key in `uri`.

    Raises:
        EncryptionError: the file is missing, unreadable or not a 32-byte key.
    """
    options = config.options if config is not None else None
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


@dataclass
class EncryptionKey:
    """The key a serialize encrypts with, and where it lives.

    Attributes:
        key: the 32 bytes.
        uri: the key file.
        existing: True when the key was already in `uri` (the file is left as it is);
            False for a new key, which `stage` writes into the model's transaction.
    """

    key: bytes = field(repr=False)
    uri: str
    existing: bool

    def stage(self, tx: storage.Transaction) -> storage.StagedWrite | None:
        """A new key: staged in `tx`, to be published with the model (never over a file
        that appeared meanwhile). An existing key: nothing to write (None)."""
        if self.existing:
            return None
        return stage_key(tx, self.uri, self.key)


def prepare_key(uri: str, config: TensorizerConfig, *, generate: bool = True) -> EncryptionKey:
    """The key for a serialize to `uri`: the one the file holds, else a new random one.

    Args:
        uri: the key file (a local path or ``s3://`` URI).
        config: S3 credentials and transport settings (`TensorizerConfig.options`).
        generate: whether a missing file may get a new key; when False it must exist.

    Returns:
        An `EncryptionKey`; a new key reaches `uri` only through `EncryptionKey.stage` and
        the commit of that transaction (mode 0600), never over a file that appeared
        meanwhile.

    Raises:
        EncryptionError: the file exists but is not a 32-byte key, or it is missing and
            `generate` is False.
        StorageError: a new key cannot be written where `uri` points.
    """
    options = config.options
    if storage.exists(uri, options):
        return EncryptionKey(read_key(uri, config), uri, existing=True)
    if not generate:
        raise EncryptionError(
            f"the key file {uri} does not exist (generate_keyfile=False encrypts with the key "
            "already in it)"
        )
    storage.check_writable(storage.parent(uri), options)
    return EncryptionKey(generate_key(), uri, existing=False)
