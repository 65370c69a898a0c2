"""What a transaction stages: a file (`StagedWrite`) or a whole local directory
(`StagedDirectory`), written under a temporary name and published by the transaction.

Each knows how to publish itself, how to keep aside what its publish replaces and put it
back, so `transaction.Transaction` treats both alike. A directory staged with
``temporary=True`` (scratch space, such as a LoRA adapter written for vLLM to read) lives
until the process exits: `remove_temporary_directories` deletes it then (registered with
`atexit` once, here), and no caller keeps a list of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import StorageError
from ..core.redaction import scrubbing
from .base import backend, basename, join, parent
from .local import move_directory, path_of, publish_directory, remove_directory
from .options import StreamOptions

logger = scrubbing(__name__)

__all__ = [
    "StagedWrite",
    "StagedDirectory",
    "temporary_directories",
    "remove_temporary_directories",
]


@dataclass
class StagedWrite:
    """A file being written under a temporary name; its transaction publishes it.

    Attributes:
        uri: the final location.
        path: the local file to write now.
        mode: the permission bits of the published file (local files).
        replace: whether a file already at `uri` may be replaced; when False, publishing
            raises `AlreadyExists` instead and leaves that file as it is.
        last: published after every file staged without it.
    """

    uri: str
    path: str
    options: StreamOptions = field(repr=False)
    mode: int = 0o644
    replace: bool = True
    last: bool = False
    done: bool = False
    sent: Any = field(default=None, repr=False)  # what `send_ahead` sent (S3: the parts)

    def send_ahead(self) -> None:
        """Send the written file towards its final name without publishing it (S3: the
        parts of its multipart upload; nothing for a local file), once."""
        if self.done or self.sent is not None:
            return
        self.sent = backend(self.uri).send_ahead(
            self.path, self.uri, self.options, replace=self.replace
        )

    def commit(self) -> None:
        """Publish the written file under its final name (atomically). Called by the
        transaction, which first keeps aside what it replaces."""
        if self.done:
            return
        try:
            os.chmod(self.path, self.mode)
        except OSError as e:
            raise StorageError(f"cannot write {self.uri}: {e.strerror or e}") from e
        self._publish()
        self.done = True

    def _publish(self) -> None:
        sent, self.sent = self.sent, None  # completed, or aborted by a failed completion
        backend(self.uri).publish_object(
            self.path, self.uri, self.options, replace=self.replace, sent=sent
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left behind by uploads; gone after a local rename

    def abort(self) -> None:
        """Delete the temporary file and drop what was sent ahead; the final name is left
        as it was. (A send that cannot be dropped, the store being unreachable, is logged
        with the upload it leaves.)"""
        if self.done:
            return
        sent, self.sent = self.sent, None
        if sent is not None:
            try:
                backend(self.uri).discard(sent, self.options)
            except StorageError as e:
                logger.warning("%s", e)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.done = True

    # -- what the transaction does around the publish ---------------------------------------

    def keep_aside(self) -> str | None:
        """Keep what is at `uri` under a hidden name (``.NAME.kept-XXXX``) before the publish
        replaces it; None when nothing is there. A file stays at `uri` meanwhile."""
        store = backend(self.uri)
        if not store.exists(self.uri, self.options):
            return None
        kept = _kept_name(self.uri)
        store.keep_aside(self.uri, kept, self.options)
        return kept

    def unkeep(self, kept: str) -> None:
        """The publish failed: `uri` is as it was; drop the kept copy."""
        backend(kept).delete(kept, self.options)

    def put_back(self, kept: str | None) -> None:
        """Undo the publish: what was at `uri` (`kept`) is back there, or nothing is."""
        store = backend(self.uri)
        if kept is None:
            store.delete(self.uri, self.options)
        else:
            store.restore(kept, self.uri, self.options)

    def drop_kept(self, kept: str) -> None:
        """The transaction committed: the kept copy is no longer needed."""
        backend(kept).delete(kept, self.options)

    def finished(self) -> None:
        """The transaction committed (final)."""


@dataclass
class StagedDirectory(StagedWrite):
    """A local directory filled under a temporary name (``path``, 0700) and published whole
    by a rename. A directory already at `uri` is replaced (moved aside, then deleted);
    one published with ``temporary=True`` is deleted when the process exits."""

    mode: int = 0o700
    temporary: bool = False

    def _publish(self) -> None:
        publish_directory(self.path, path_of(self.uri), replace=self.replace)

    def abort(self) -> None:
        if not self.done:
            remove_directory(self.path)
            self.done = True

    def keep_aside(self) -> str | None:
        final = path_of(self.uri)
        if not os.path.exists(final):
            return None
        kept = _kept_name(final)
        move_directory(final, kept)  # the name is free until the publish fills it
        return kept

    def unkeep(self, kept: str) -> None:
        move_directory(kept, path_of(self.uri))

    def put_back(self, kept: str | None) -> None:
        remove_directory(path_of(self.uri))
        if kept is not None:
            move_directory(kept, path_of(self.uri))

    def drop_kept(self, kept: str) -> None:
        remove_directory(kept)

    def finished(self) -> None:
        if self.temporary:
            _temporary.add(path_of(self.uri))


def _kept_name(uri: str) -> str:
    """A hidden name beside `uri` for what a publish replaces (``.NAME.kept-XXXX``)."""
    return join(parent(uri), f".{basename(uri)}.kept-{secrets.token_hex(4)}")


class _TemporaryDirectories:
    """Directories published with ``temporary=True``: deleted at process exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: list[str] = []

    def add(self, path: str) -> None:
        with self._lock:
            if path not in self._paths:
                self._paths.append(path)

    def paths(self) -> list[str]:
        with self._lock:
            return [p for p in self._paths if os.path.exists(p)]

    def remove_all(self) -> None:
        with self._lock:
            paths, self._paths = self._paths, []
        for path in paths:
            remove_directory(path)


_temporary = _TemporaryDirectories()
atexit.register(_temporary.remove_all)


def temporary_directories() -> list[str]:
    """The directories published with ``temporary=True`` in this process that still
    exist (each is deleted when the process exits)."""
    return _temporary.paths()


def remove_temporary_directories() -> None:
    """Delete every directory published with ``temporary=True`` now (as at exit)."""
    _temporary.remove_all()
