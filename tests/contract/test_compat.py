"""format.compat: tensorizer's exceptions become this package's, by the one table (pure
logic on tensorizer's real exception classes; no file needed)."""

from __future__ import annotations

import struct

import pytest
from tensorizer.serialization import CryptographyError, HashMismatchError

from tensorize_vllm_model.core.errors import (
    CorruptTensorError,
    EncryptionError,
    FormatError,
    StorageError,
)
from tensorize_vllm_model.format.compat import translate_errors


def raised(error: BaseException, keyfile: str | None = "/keys/k") -> BaseException:
    with (
        pytest.raises(BaseException) as caught,
        translate_errors("/m/model.tensors", keyfile=keyfile),
    ):
        raise error
    return caught.value


@pytest.mark.parametrize(
    "error, kind, words",
    [
        (
            CryptographyError("Tensor is encrypted, but decryption was not requested"),
            EncryptionError,
            "give the key",
        ),
        (
            CryptographyError("Tensor is not flagged as encrypted"),
            EncryptionError,
            "leave the key out",
        ),
        (
            CryptographyError("MAC check failed"),
            EncryptionError,
            "with the key in /keys/k: wrong key",
        ),
        (struct.error("unpack requires a buffer"), FormatError, "truncated or corrupt"),
        (ValueError("File too small"), FormatError, "truncated or corrupt: File too small"),
        (ValueError("bad"), FormatError, "is corrupt: bad"),
        (OSError("disk gone"), StorageError, "cannot read /m/model.tensors: disk gone"),
        (KeyError("x"), FormatError, "is corrupt (KeyError"),
    ],
)
def test_table_names_the_file(error, kind, words):
    got = raised(error)
    assert type(got) is kind and "/m/model.tensors" in str(got) and words in str(got)


def test_hash_mismatch_names_the_tensor():
    got = raised(HashMismatchError("Tensor '.layers.0.w' failed CRC32 verification"))
    assert isinstance(got, CorruptTensorError) and got.tensor == "layers.0.w"


def test_out_of_memory_and_our_errors_pass_through():
    oom = RuntimeError("CUDA out of memory")
    assert raised(oom) is oom
    ours = FormatError("already ours")
    assert raised(ours) is ours
