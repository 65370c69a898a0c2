"""Local files: plain paths and ``file://`` URIs."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from typing import BinaryIO

from ..errors import StorageError

__all__ = [
    "path_of",
    "open_read",
    "exists",
    "list_names",
    "make_temp",
    "publish",
    "publish_new",
    "keep_aside",
    "restore",
    "delete",
]


def path_of(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def open_read(uri: str) -> BinaryIO:
    path = path_of(uri)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise StorageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise StorageError(f"{path} is a directory, not a file") from None
    except OSError as e:
        raise StorageError(f"cannot open {path}: {e.strerror or e}") from e


def exists(uri: str) -> bool:
    return os.path.exists(path_of(uri))


def list_names(uri: str) -> list[str]:
    """Names of the regular files directly in a directory."""
    path = path_of(uri)
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_file())
    except FileNotFoundError:
        raise StorageError(f"no such directory: {path}") from None


def make_temp(uri: str) -> str:
    """A private (0600) temporary file beside the final file, so publishing is a rename."""
    final = path_of(uri)
    directory = os.path.dirname(os.path.abspath(final))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, temp = tempfile.mkstemp(
            prefix=f".{os.path.basename(final)}.",
            suffix=f".tmp-{secrets.token_hex(4)}",
            dir=directory,
        )
        os.close(fd)
    except OSError as e:
        raise StorageError(f"cannot write into {directory}: {e.strerror or e}") from e
    return temp


def publish(temp: str, uri: str) -> None:
    """Atomically move a fully written temporary file to its final name."""
    final = path_of(uri)
    try:
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, final)
    except OSError as e:
        raise StorageError(f"cannot write {final}: {e.strerror or e}") from e
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_new(temp: str, uri: str) -> None:
    """Publish a fully written temporary file under a name that must not exist yet: a file
    already there (even one that appeared a moment ago) is never replaced.

    Raises:
        StorageError: a file exists at `uri` (named), or it cannot be written.
    """
    final = path_of(uri)
    try:
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(temp, final)  # atomic, and fails on an existing name
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: create the name exclusively
            import shutil

            with open(temp, "rb") as source, open(final, "xb") as target:
                try:  # the name is ours from here: a failed copy leaves nothing at it
                    shutil.copyfileobj(source, target)
                    os.chmod(final, os.stat(temp).st_mode & 0o777)
                    os.fsync(target.fileno())
                except BaseException:
                    os.unlink(final)
                    raise
    except FileExistsError:
        raise StorageError(f"{final} already exists; it was left as it is (not replaced)") from None
    except OSError as e:
        raise StorageError(f"cannot write {final}: {e.strerror or e}") from e
    os.unlink(temp)


def keep_aside(uri: str, backup: str) -> None:
    """Keep the file at `uri` under `backup` too (a hard link: the file stays in place)."""
    final, spare = path_of(uri), path_of(backup)
    try:
        try:
            os.link(final, spare)
        except OSError:  # a file system without hard links
            import shutil

            shutil.copy2(final, spare)
    except OSError as e:
        raise StorageError(f"cannot keep a copy of {final}: {e.strerror or e}") from e


def restore(backup: str, uri: str) -> None:
    os.replace(path_of(backup), path_of(uri))


def delete(uri: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path_of(uri))
