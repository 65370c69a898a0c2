"""All-or-nothing writes: one transaction publishes every file staged in it, or none.

    with storage.transaction(options) as tx:
        w = tx.stage(uri)             # a private temporary file to write now
        write(w.path)
    # here every staged file is at its final name; on ANY exception (KeyboardInterrupt and
    # SystemExit included) none is, and every file a publish replaced is back as it was.

Before anything is published, every staged file is sent ahead (`Transaction.send_ahead`: on
S3 the parts of its multipart upload, not completed), so a transfer that fails or a store
that goes away leaves every name as it was; publishing is then one short request per file.
Files are published in the order they were staged, those staged with ``last=True`` after all
the others (a tensors file is staged last, so a tensors file that exists is complete). A
file already at a final name is kept aside under a hidden name (``.NAME.kept-XXXX``) before
it is replaced, so a rollback can put it back; the kept copies are dropped on commit.

A whole local directory is staged the same way (`Transaction.stage_directory`: a model's
files fetched into a cache, a LoRA adapter written for vLLM): filled under a temporary name,
renamed into place whole, or deleted on rollback. What is staged is in `staged`.

A transaction that outlives one ``with`` block (a vLLM worker stages its file in one call
and publishes it in another) is driven by `Transaction.commit` / `Transaction.rollback`;
one still open when the process exits is rolled back then.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType

from ..core.errors import ConfigError
from ..core.redaction import scrubbing
from .base import backend
from .local import stage_directory
from .options import Options, StreamOptions
from .staged import StagedDirectory, StagedWrite

__all__ = ["StagedWrite", "StagedDirectory", "Transaction", "transaction"]

logger = scrubbing(__name__)


class Transaction:
    """Files staged together and published all or none (see the module docstring)."""

    def __init__(self, options: StreamOptions):
        self.options = options
        self._staged: list[StagedWrite] = []
        self._published: list[tuple[StagedWrite, str | None]] = []  # (what, kept copy)
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

    def stage_directory(
        self, uri: str, *, replace: bool = True, temporary: bool = False
    ) -> StagedDirectory:
        """A private (0700) empty local directory to fill now; published whole at `uri` on
        commit (a rename, replacing a directory already there unless ``replace=False``).
        With ``temporary=True`` the published directory is deleted when the process exits
        (scratch space; see `staged.temporary_directories`).

        Raises:
            ConfigError: `uri` is not a local path.
            StorageError: the temporary directory cannot be created.
        """
        if self.closed:
            raise RuntimeError("the transaction is closed")
        path = backend(uri).local_path(uri)
        if path is None:
            raise ConfigError(f"{redact(uri)}: only a local directory can be staged whole")
        temp = stage_directory(path)
        staged = StagedDirectory(uri, temp, self.options, replace=replace, temporary=temporary)
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

    def send_ahead(self) -> None:
        """Send every staged file towards its final name without publishing any (S3: the
        parts of each multipart upload); publishing does this first anyway. Rolls back and
        raises if any send fails."""
        try:
            for staged in self.staged:
                staged.send_ahead()
        except BaseException:
            self.rollback()
            raise

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
            staged, kept = self._published.pop()
            if kept is not None:
                with contextlib.suppress(Exception):
                    staged.drop_kept(kept)
        for staged in self._staged:
            staged.finished()

    def rollback(self) -> None:
        """Put back every name published so far, delete the staged temporaries, then run
        the `on_rollback` callbacks. Errors are logged, not raised (the failure that
        caused the rollback is the one to report)."""
        self.closed = True
        _open.discard(self)
        while self._published:
            staged, kept = self._published.pop()
            try:
                staged.put_back(kept)
            except Exception:  # noqa: BLE001
                logger.warning("could not restore %s after a failed write", redact(staged.uri))
        for staged in self._staged:
            staged.abort()
        while self._on_rollback:
            try:
                self._on_rollback.pop()()
            except Exception:  # noqa: BLE001
                logger.warning("undoing part of a failed write failed", exc_info=True)

    def _publish_all(self, *, keep_last: bool) -> None:
        self.send_ahead()
        pending = [s for s in self.staged if not s.done]
        try:
            for number, staged in enumerate(pending, start=1):
                self._publish(staged, keep=keep_last or number < len(pending))
        except BaseException:
            self.rollback()
            raise

    def _publish(self, staged: StagedWrite, *, keep: bool) -> None:
        """Publish `staged`; with `keep`, first keep aside what it replaces.

        An interrupt (Ctrl-C, SIGTERM: not an `Exception`) inside the publish leaves it
        unknown whether the store made the file visible: the name is then put back by the
        rollback (the kept copy restored, or a name that was free deleted) rather than
        left holding a file of a write that failed. A name not known to be free with
        nothing kept (the last file of a replacing write) is left as it is."""
        kept = staged.keep_aside() if keep and staged.replace else None
        free = staged.replace and (kept is None if keep else _free(staged))
        try:
            staged.commit()
        except Exception:
            if kept is not None:
                with contextlib.suppress(Exception):
                    staged.unkeep(kept)
            raise
        except BaseException:
            if kept is not None or free:
                self._published.append((staged, kept))  # the rollback puts the name back
            raise
        self._published.append((staged, kept))

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


def _free(staged: StagedWrite) -> bool:
    """Whether nothing is at `staged`'s name now (False where that cannot be told)."""
    try:
        return not backend(staged.uri).exists(staged.uri, staged.options)
    except Exception:  # noqa: BLE001
        return False
