"""The package's exception hierarchy.

Every error the package raises on bad input derives from `TensorizeError`, so callers can
catch one type, and the command line can turn it into a one-line message and exit code 2
without a traceback. Messages name the file, key or flag at fault and, where there is one,
the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from .redaction import redact_text

__all__ = [
    "TensorizeError",
    "ConfigError",
    "StorageError",
    "NotFound",
    "AccessDenied",
    "CredentialsError",
    "Unreachable",
    "Stalled",
    "Throttled",
    "AlreadyExists",
    "TooLarge",
    "EncryptionError",
    "FormatError",
    "CorruptTensorError",
    "ModelMismatchError",
    "LayoutError",
    "WorkerError",
    "entry_point",
    "extra_config_name",
    "key_hint",
    "setting_hint",
]


class TensorizeError(Exception):
    """Base class of every error this package raises on bad input or a failed transfer.

    Its message is redacted (`redaction.redact_text`): a signed URL's query string, user
    info or account key given to it never shows in ``str(error)`` or ``error.args``."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.args = tuple(redact_text(a) if isinstance(a, str) else a for a in self.args)


class ConfigError(TensorizeError, ValueError):
    """An option, flag or configuration value is missing, unknown or out of range."""


class StorageError(TensorizeError, OSError):
    """A file or object could not be read or written (missing, unreachable, refused)."""


class NotFound(StorageError):
    """No file, object or bucket at the URI (local ``ENOENT``, S3 ``NoSuchKey`` /
    ``NoSuchBucket`` / 404, HTTP 404)."""


class TooLarge(StorageError):
    """A whole-file read (`storage.read_bytes` with a limit) refused a file larger than the
    limit."""


class AccessDenied(StorageError):
    """The store refused the credentials or the permission (local ``EACCES``/``EPERM``,
    S3 403 / ``AccessDenied`` / ``InvalidAccessKeyId`` / ``SignatureDoesNotMatch``,
    HTTP 401/403)."""


class CredentialsError(AccessDenied, ConfigError):
    """No usable credentials for a store: one that is half given (``AWS_ACCESS_KEY_ID``
    without its secret), or none found where the store needs some. The message names what
    is missing and where each backend looks (docs/s3.md, docs/gcs-azure.md)."""


class Unreachable(StorageError):
    """The store could not be reached or did not answer in time (no connection, TLS
    failure, timeouts, a transfer that kept dropping after the retries)."""


class Stalled(Unreachable):
    """A transfer started, then no data arrived for the read timeout."""


class Throttled(Unreachable):
    """The store kept answering "slow down" (S3 503 ``SlowDown``, HTTP 503 / 429) to every
    attempt of the retry policy (`storage.retry`)."""


class AlreadyExists(StorageError):
    """A write that must not replace anything found a file at its name (left as it is)."""


class EncryptionError(TensorizeError):
    """A key is missing, malformed or does not decrypt the tensors."""


class FormatError(TensorizeError):
    """A file is not a readable tensorizer file (truncated, corrupt or another format)."""


class CorruptTensorError(FormatError):
    """A tensor's data does not match the hash stored with it (or does not decrypt)."""

    def __init__(self, message: str, *, tensor: str):
        super().__init__(message)
        self.tensor = tensor


class ModelMismatchError(TensorizeError):
    """The tensors in a file do not fit the model being loaded."""


class LayoutError(TensorizeError):
    """The files were serialized for another tensor/pipeline-parallel layout."""


class WorkerError(TensorizeError):
    """A vLLM worker failed while running this package's code (its message is vLLM's)."""


# -- the fix, in the words of the entry point in use --------------------------------------
# A message that names a fix names it as the user gives it: a flag of this package's command
# line ("cli"), a field of vLLM's loader extra config with `vllm serve` ("vllm serve") or
# `LLM(...)` ("LLM"), or a keyword of this package's Python functions ("python", the default).
ENTRY_POINTS = ("python", "cli", "vllm serve", "LLM")
_ENTRY: contextvars.ContextVar[str] = contextvars.ContextVar(
    "tensorize_vllm_model_entry_point", default="python"
)


@contextlib.contextmanager
def entry_point(name: str) -> Iterator[None]:
    """Within the block, messages name fixes in the words of entry point `name` (one of
    `ENTRY_POINTS`); an entry point already set by an outer block (the command line, which
    starts vLLM in its own process) is kept."""
    if name not in ENTRY_POINTS:
        raise ValueError(f"unknown entry point {name!r}; one of {ENTRY_POINTS}")
    token = _ENTRY.set(name) if _ENTRY.get() == "python" else None
    try:
        yield
    finally:
        if token is not None:
            _ENTRY.reset(token)


def current_entry_point() -> str:
    """The entry point in use (see `entry_point`)."""
    return _ENTRY.get()


def key_hint() -> str:
    """How to give the decryption key, in the words of the entry point in use."""
    return {
        "cli": "give the key with --keyfile KEYFILE",
        "vllm serve": "give the key as encryption_keyfile in --model-loader-extra-config, "
        'e.g. --model-loader-extra-config \'{"encryption_keyfile": "KEYFILE"}\'',
        "LLM": "give the key as encryption_keyfile in model_loader_extra_config, e.g. "
        'LLM(..., model_loader_extra_config={"encryption_keyfile": KEYFILE})',
    }.get(
        _ENTRY.get(),
        'give the key in the config= argument, e.g. config={"encryption_keyfile": KEYFILE}',
    )


def extra_config_name() -> str:
    """Where the loader's options were given, in the words of the entry point in use."""
    return {
        "cli": "--model-loader-extra-config",
        "vllm serve": "--model-loader-extra-config",
        "LLM": "model_loader_extra_config",
    }.get(_ENTRY.get(), "the config= argument")


def setting_hint(name: str, value: object) -> str:
    """Engine setting `name` (an ``EngineArgs`` field) = `value`, as the entry point in use
    spells it: ``--tensor-parallel-size 2`` on a command line, ``tensor_parallel_size=2``
    in Python."""
    if _ENTRY.get() in ("cli", "vllm serve"):
        return f"--{name.replace('_', '-')} {value}"
    return f"{name}={value}"
