"""The package's exception hierarchy.

Every error the package raises on bad input derives from `TensorizeError`, so callers can
catch one type, and the command line can turn it into a one-line message and exit code 2
without a traceback. Messages name the file, key or flag at fault and, where there is one,
the fix.
"""

from __future__ import annotations

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
    "EncryptionError",
    "FormatError",
    "CorruptTensorError",
    "ModelMismatchError",
    "LayoutError",
    "WorkerError",
]


class TensorizeError(Exception):
    """Base class of every error this package raises on bad input or a failed transfer."""


class ConfigError(TensorizeError, ValueError):
    """An option, flag or configuration value is missing, unknown or out of range."""


class StorageError(TensorizeError, OSError):
    """A file or object could not be read or written (missing, unreachable, refused)."""


class NotFound(StorageError):
    """No file, object or bucket at the URI (local ``ENOENT``, S3 ``NoSuchKey`` /
    ``NoSuchBucket`` / 404, HTTP 404)."""


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
