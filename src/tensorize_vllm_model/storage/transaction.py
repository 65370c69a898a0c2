"""All-or-nothing writes: one transaction publishes every file staged in it, or none.

    with storage.transaction(options) as tx:
        w = tx.stage(uri)             # a private temporary file to write now
        write(w.path)
    # here every staged file is at its final name; on ANY exception (KeyboardInterrupt and
    # SystemExit included) none is, and every file a publish replaced is back as it was.

Files are published in the order they were staged, those staged with ``last=True`` after all
the others (a tensors file is staged last, so a tensors file that exists is complete). A
file already at a final name is kept aside under a hidden name (``.NAME.kept-XXXX``) before
it is replaced, so a rollback can put it back; the kept copies are dropped on commit.

A transaction that outlives one ``with`` block (a vLLM worker stages its file in one call
and publishes it in another) is driven by `Transaction.commit` / `Transaction.rollback`;
one still open when the process exits is rolled back then.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from ..errors import StorageError
from .base import backend, basename, join, parent
from .options import Options, StreamOptions

__all__ = ["StagedWrite", "Transaction", "transaction"]

logger = logging.getLogger(__name__)


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

    def commit(self) -> None:
        """Publish the written file under its final name (atomically). Called by the
        transaction, which first keeps aside what it replaces."""
        if self.done:
            return
        try:
            os.chmod(self.path, self.mode)
        except OSError as e:
            raise StorageError(f"cannot write {self.uri}: {e.strerror or e}") from e
        backend(self.uri).publish(self.path, self.uri, self.options, replace=self.replace)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left behind by uploads; gone after a local rename
        self.done = True

    def abort(self) -> None:
        """Delete the temporary file; the final name is left as it was."""
        if self.done:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.done = True


class Transaction:
    """Files staged together and published all or none (see the module docstring)."""

    def __init__(self, options: StreamOptions):
        self.options = options
        self._staged: list[StagedWrite] = []
        self._published: list[tuple[str, str | None]] = []  # (uri, kept copy or None)
        self._on_rollback: list[Callable[[], object]] = []
        self.closed = False
        _open.add(self)

    # -- building ----------------------------------------------------------------------------

    def stage(
        self, uri: str, *, mode: int = 0o644, replace: bool = True, last: bool = False
    ) -> StagedWrite:
        """A private (0600) temporary file to write now; published at `uri` on commit.

        Local files are staged beside their final name (the commit is a rename); S3 objects
        in the temporary directory (the commit is an upload). With ``replace=False`` the
        commit never replaces a file that is at `uri` by then (locally a hard link; on S3
        ``If-None-Match: *``) and raises `AlreadyExists` naming it.

        Raises:
            ConfigError: a URI that cannot be written (http(s)://).
            StorageError: the temporary file cannot be created.
        """
        if self.closed:
            raise RuntimeError("the transaction is closed")
        temp = backend(uri).stage(uri, self.options)
        staged = StagedWrite(uri, temp, self.options, mode=mode, replace=replace, last=last)
        self._staged.append(staged)
        return staged

    def on_rollback(self, undo: Callable[[], object]) -> None:
        """Have `undo` run when the transaction rolls back (after the files are put back):
        for parts of the write held elsewhere, e.g. the files vLLM's workers staged."""
        self._on_rollback.append(undo)

    @property
    def staged(self) -> list[StagedWrite]:
        """The staged files, in the order they are published."""
        return [s for s in self._staged if not s.last] + [s for s in self._staged if s.last]

    @property
    def uris(self) -> list[str]:
        return [s.uri for s in self.staged]

    # -- finishing ---------------------------------------------------------------------------

    def publish(self) -> None:
        """Publish every staged file now, keeping what each replaces so that `rollback`
        can still put everything back (for a transaction that must wait on another
        party before it is final). Rolls back and raises if any publish fails."""
        self._publish_all(keep_last=True)

    def commit(self) -> None:
        """Publish everything, then drop the kept copies: final. (The last file published
        needs no kept copy: nothing after it can fail.)"""
        self._publish_all(keep_last=False)
        self.closed = True
        _open.discard(self)
        while self._published:
            _, kept = self._published.pop()
            if kept is not None:
                with contextlib.suppress(Exception):
                    backend(kept).delete(kept, self.options)

    def rollback(self) -> None:
        """Put back every name published so far, delete the staged temporaries, then run
        the `on_rollback` callbacks. Errors are logged, not raised (the failure that
        caused the rollback is the one to report)."""
        self.closed = True
        _open.discard(self)
        while self._published:
            uri, kept = self._published.pop()
            try:
                if kept is None:
                    backend(uri).delete(uri, self.options)
                else:
                    backend(uri).restore(kept, uri, self.options)
            except Exception:  # noqa: BLE001
                logger.warning("could not restore %s after a failed write", redact(uri))
        for staged in self._staged:
            staged.abort()
        while self._on_rollback:
            try:
                self._on_rollback.pop()()
            except Exception:  # noqa: BLE001
                logger.warning("undoing part of a failed write failed", exc_info=True)

    def _publish_all(self, *, keep_last: bool) -> None:
        pending = [s for s in self.staged if not s.done]
        try:
            for number, staged in enumerate(pending, start=1):
                self._publish(staged, keep=keep_last or number < len(pending))
        except BaseException:
            self.rollback()
            raise

    def _publish(self, staged: StagedWrite, *, keep: bool) -> None:
        """Publish `staged`; with `keep`, first keep aside a file it replaces."""
        store = backend(staged.uri)
        kept = None
        if keep and staged.replace and store.exists(staged.uri, self.options):
            kept = join(parent(staged.uri), f".{basename(staged.uri)}.kept-{secrets.token_hex(4)}")
            store.keep_aside(staged.uri, kept, self.options)
        try:
            staged.commit()
        except BaseException:
            if kept is not None:
                with contextlib.suppress(Exception):
                    store.delete(kept, self.options)
            raise
        self._published.append((staged.uri, kept))

    # -- the with-statement ------------------------------------------------------------------

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.closed:  # finished inside the block already
            return
        if kind is None:
            self.commit()
        else:
            self.rollback()


def redact(uri: str) -> str:
    return backend(uri).redact(uri)


def transaction(options: Options = None) -> Transaction:
    """A new `Transaction`; `options` (`StreamOptions`, a ``stream_kwargs``-style dict, or
    None) say how to reach remote storage."""
    return Transaction(StreamOptions.from_mapping(options))


# Transactions not finished yet: rolled back if the process exits first (a worker whose
# engine was interrupted leaves no temporary files behind).
_open_lock = threading.Lock()


class _OpenTransactions:
    def __init__(self) -> None:
        self._items: list[Transaction] = []

    def add(self, tx: Transaction) -> None:
        with _open_lock:
            self._items.append(tx)

    def discard(self, tx: Transaction) -> None:
        with _open_lock:
            if tx in self._items:
                self._items.remove(tx)

    def roll_back_all(self) -> None:
        while self._items:
            self._items[-1].rollback()


_open = _OpenTransactions()
atexit.register(_open.roll_back_all)
