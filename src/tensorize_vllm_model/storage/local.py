"""Local files: plain paths and ``file://`` URIs.

Writes are staged beside their final name (a hidden ``.NAME.XXXX.tmp-YYYY``), so publishing
is an atomic rename (or, for a write that must not replace anything, a hard link, which
fails on an existing name). A whole directory is staged the same way (`stage_directory`)
and published by renaming it (`publish_directory`). `OSError`s become typed errors by errno
in `_error`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from typing import Any, BinaryIO

from ..core.errors import AccessDenied, AlreadyExists, NotFound, StorageError, TooLarge
from .base import Backend
from .options import StreamOptions

__all__ = [
    "LocalBackend",
    "path_of",
    "stage_directory",
    "publish_directory",
    "move_directory",
    "remove_directory",
]

_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def path_of(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _error(e: OSError, path: str, doing: str, missing: str = "file") -> StorageError:
    """The typed error for `e` (by its errno), naming `path`: the one place local errors
    are mapped."""
    if e.errno == errno.ENOENT:
        return NotFound(f"no such {missing}: {path}")
    if e.errno == errno.EISDIR:
        return StorageError(f"{path} is a directory, not a file")
    if e.errno == errno.EEXIST:
        return AlreadyExists(f"{path} already exists; it was left as it is (not replaced)")
    kind = AccessDenied if e.errno in _DENIED else StorageError
    return kind(f"cannot {doing} {path}: {e.strerror or e}")


def _fsync_directory(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalBackend(Backend):
    """Local files (``os`` calls)."""

    writable = True

    def local_path(self, uri: str) -> str:
        return path_of(uri)

    def exists(self, uri: str, options: StreamOptions) -> bool:
        return os.path.exists(path_of(uri))

    def open_read(self, uri: str, options: StreamOptions) -> BinaryIO:
        path = path_of(uri)
        try:
            return open(path, "rb")
        except OSError as e:
            raise _error(e, path, "open") from None

    def read_bytes(self, uri: str, options: StreamOptions, limit: int | None) -> bytes:
        with self.open_read(uri, options) as f:
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise TooLarge(f"{uri} is larger than the {limit} bytes expected")
        return data

    def list_names(self, uri: str, options: StreamOptions, recursive: bool = False) -> list[str]:
        """Names of the regular files directly in a directory (with `recursive`, the
        "/"-separated relative paths of those below it too; linked directories are not
        followed)."""
        path = path_of(uri)
        try:
            if recursive:
                os.scandir(path).close()  # a missing directory fails as below
                return sorted(
                    os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                    for root, _, files in os.walk(path)
                    for f in files
                    if os.path.isfile(os.path.join(root, f))
                )
            return sorted(e.name for e in os.scandir(path) if e.is_file())
        except OSError as e:
            raise _error(e, path, "list", missing="directory") from None

    def check_writable(self, directory: str, options: StreamOptions) -> None:
        """The directory can be created and written: probed by creating a directory in
        its nearest existing ancestor (`os.access` says yes to root everywhere, and nothing
        about /proc or sysfs)."""
        path = os.path.abspath(path_of(directory))
        existing = path
        while not os.path.exists(existing):  # the nearest ancestor that exists
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise StorageError(f"cannot write under {path}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise AccessDenied(f"cannot write under {path}: {existing} is not writable")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".tensorize-probe-", dir=existing))
        except OSError as e:
            kind = AccessDenied if e.errno in _DENIED else StorageError
            raise kind(
                f"cannot write under {path}: cannot create a directory in "
                f"{existing} ({e.strerror or e})"
            ) from e

    def stage(self, uri: str, options: StreamOptions) -> str:
        """A private (0600) temporary file beside the final file, so publishing is a rename."""
        return _staged_name(path_of(uri), tempfile.mkstemp)

    def being_written(self, uri: str, options: StreamOptions) -> bool:
        """Whether a staged temporary of `uri` (file or directory) exists: a write to it is
        under way, or its writer died before it could roll back."""
        final = path_of(uri)
        staged = re.compile(
            rf"\.{re.escape(os.path.basename(final))}\.[^.]+{re.escape(_STAGED_TAG)}[0-9a-f]+"
        )
        try:
            names = os.listdir(os.path.dirname(os.path.abspath(final)))
        except OSError:
            return False
        return any(staged.fullmatch(n) for n in names)

    def publish_object(
        self, temp: str, uri: str, options: StreamOptions, *, replace: bool, sent: Any = None
    ) -> None:
        final = path_of(uri)
        try:
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            if replace:
                os.replace(temp, final)
            else:
                _publish_new(temp, final)
        except OSError as e:
            raise _error(e, final, "write") from None
        _fsync_directory(final)

    def keep_aside(self, uri: str, backup: str, options: StreamOptions) -> None:
        """A hard link (a copy where links are not supported): the file stays in place."""
        final, spare = path_of(uri), path_of(backup)
        try:
            try:
                os.link(final, spare)
            except OSError:  # a file system without hard links
                shutil.copy2(final, spare)
        except OSError as e:
            raise _error(e, final, "keep a copy of") from e

    def restore(self, backup: str, uri: str, options: StreamOptions) -> None:
        """Put `backup` back at `uri`. When `uri` still is the kept file (the publish never
        reached it), rename(2) of one hard link onto another of the same file does nothing
        (POSIX): the backup name is then dropped instead."""
        spare, final = path_of(backup), path_of(uri)
        try:
            if _same_file(spare, final):
                os.unlink(spare)
                return
            os.replace(spare, final)
        except OSError as e:
            raise _error(e, path_of(uri), "restore") from e

    def delete(self, uri: str, options: StreamOptions) -> None:
        try:
            os.unlink(path_of(uri))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _error(e, path_of(uri), "delete") from e


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


_STAGED_TAG = ".tmp-"


def _staged_name(final: str, make: Any) -> str:
    """A fresh private temporary beside `final`, made by `make` (`tempfile.mkstemp`: a 0600
    file; `tempfile.mkdtemp`: a 0700 directory)."""
    directory = os.path.dirname(os.path.abspath(final))
    try:
        os.makedirs(directory, exist_ok=True)
        made = make(
            prefix=f".{os.path.basename(final)}.",
            suffix=f"{_STAGED_TAG}{secrets.token_hex(4)}",
            dir=directory,
        )
    except OSError as e:
        raise _error(e, directory, "write into", missing="directory") from e
    if isinstance(made, tuple):  # mkstemp: (fd, path)
        os.close(made[0])
        return str(made[1])
    return str(made)


def stage_directory(final: str) -> str:
    """A private (0700) empty directory beside directory `final`, to fill and then publish
    whole with `publish_directory`."""
    return _staged_name(final, tempfile.mkdtemp)


def publish_directory(temp: str, final: str, *, replace: bool) -> None:
    """Rename the filled directory `temp` to `final` (atomic). A directory already at
    `final` is moved aside first and deleted once `temp` is in place (with ``replace=False``
    it is left as it is: `AlreadyExists`). Another process that publishes the same name at
    the same moment is not an error: the name ends holding one whole directory.

    Raises:
        AlreadyExists: ``replace=False`` and `final` exists.
        StorageError: the directory cannot be renamed (named).
    """
    olds: list[str] = []  # what was at `final`, deleted once `temp` is in its place
    try:
        for _ in range(_PUBLISH_ATTEMPTS):
            try:
                os.rename(temp, final)  # fails on a non-empty directory at `final`
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise _error(e, final, "write") from e
                if not replace:
                    raise _error(OSError(errno.EEXIST, "exists"), final, "write") from e
                olds.append(stage_directory(final))
                with contextlib.suppress(FileNotFoundError):  # gone already: try again
                    os.replace(final, os.path.join(olds[-1], "old"))
                continue
            _fsync_directory(final)
            return
        raise StorageError(f"cannot write {final}: other processes keep replacing it")
    finally:
        for old in olds:
            remove_directory(old)


_PUBLISH_ATTEMPTS = 5


def move_directory(source: str, target: str) -> None:
    """Rename directory `source` to `target` (a name that does not exist)."""
    try:
        os.rename(source, target)
    except OSError as e:
        raise _error(e, source, "move") from e


def remove_directory(path: str) -> None:
    """Delete directory `path` and everything in it (nothing there is not an error)."""
    shutil.rmtree(path, ignore_errors=True)


def _publish_new(temp: str, final: str) -> None:
    """Publish `temp` under a name that must not exist yet: a file already there (even one
    that appeared a moment ago) is never replaced (`FileExistsError`)."""
    try:
        os.link(temp, final)  # atomic, and fails on an existing name
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: create the name exclusively
        with open(temp, "rb") as source, open(final, "xb") as target:
            try:  # the name is ours from here: a failed copy leaves nothing at it
                shutil.copyfileobj(source, target)
                os.chmod(final, os.stat(temp).st_mode & 0o777)
                os.fsync(target.fileno())
            except BaseException:
                os.unlink(final)
                raise
    os.unlink(temp)
