"""Writing tensors files: `write_tensors` (the record first, then the tensors, staged in a
storage transaction so nothing is at the URI until it commits), and batched writing, with
the hashing of one tensor overlapping the next.

tensorizer's ``TensorSerializer.write_tensor`` (2.12) hashes a tensor (SHA-256 and CRC32,
each on one thread) and writes it, then waits for both before it returns, so one tensor's
SHA-256 runs at a time: one core's hash speed (about 2 GB/s with SHA-NI) bounds the write.
Its ``write_state_dict`` instead queues every tensor of the dict before waiting, so the
hashes of several tensors run at once on its pool of one thread per core, beside the
writes. `write_batches` feeds ``write_state_dict`` batches of about `BATCH_BYTES`, which a
background thread prepares (casts, transposes, pages in) while the previous batch is
hashed and written, so memory stays bounded by a few batches (or the largest tensor), never
the whole model. The tensors are written with tensorizer's ``STATE_DICT`` type (what they
are: a checkpoint's state dict) and keep their names.
"""

from __future__ import annotations

import dataclasses
import inspect
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import storage
from ..core.errors import ConfigError, StorageError
from .compat import (
    DEFAULT_INDEX_BYTES,
    MAX_DIMENSIONS,
    MAX_NAME_BYTES,
    index_entry_bytes,
    reserve_index,
)
from .keys import encryption_params
from .record import MARKER_NAME, MAX_RECORD_BYTES, RECORD_NAME, FileRecord

__all__ = [
    "BATCH_BYTES",
    "SerializeResult",
    "StagedTensors",
    "batches",
    "check_serialization_kwargs",
    "index_room",
    "write_batches",
    "write_tensors",
]


@dataclass
class SerializeResult:
    """What a serialize or a convert wrote (re-exported by `serialization`)."""

    directory: str
    tensors_uri: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    keyfile: str | None = None
    # True when the key was already in `keyfile` (left unchanged); False for a new key.
    key_existing: bool = False
    # files of the model directory not carried beside the tensors ("path (why)":
    # the weights, hidden files; `artifacts.stage_artifacts`)
    left_out: list[str] = field(default_factory=list)


BATCH_BYTES = 256 << 20  # one write_state_dict call: enough tensors to keep both cores busy
_DONE = object()


def batches(
    tensors: Iterable[tuple[str, torch.Tensor]], batch_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of `tensors` of at least `batch_bytes` each (the last may be
    smaller); a tensor larger than that is a group with the tensors before it."""
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        group.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= batch_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


def _prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """`items`, produced on a background thread up to `depth` ahead; its exceptions are
    raised here. Stopping early (close, an error here) stops the thread."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((True, _DONE))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            ready.put((False, e))

    thread = threading.Thread(target=produce, name="tensorize-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass


def write_batches(
    serializer,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    batch_bytes: int = BATCH_BYTES,
    on_batch: Callable[[int, int], None] | None = None,
) -> None:
    """Write `tensors` ((name, contiguous CPU tensor) pairs, in order) with `serializer`, a
    ``tensorizer.TensorSerializer``, one ``write_state_dict`` call per batch.

    Args:
        on_batch: called with (tensors, bytes) of each batch once it is written.

    Raises:
        whatever the tensor source or tensorizer raises (``OSError`` on a write failure).
    """
    for group in _prefetched(batches(tensors, batch_bytes)):
        serializer.write_state_dict(dict(group))
        if on_batch is not None:
            on_batch(len(group), sum(t.numel() * t.element_size() for _, t in group))


@dataclass
class StagedTensors:
    """A tensors file staged in a transaction, with what it holds.

    `commit()` / `abort()` finish the transaction `write_tensors` opened for the file when
    the caller gave none; a file staged in the caller's transaction is published with it.
    """

    staged: storage.StagedWrite
    tensors: int = 0
    bytes: int = 0
    transaction: storage.Transaction | None = None

    @property
    def uri(self) -> str:
        return self.staged.uri

    def commit(self) -> None:
        self._own().commit()

    def abort(self) -> None:
        self._own().rollback()

    def _own(self) -> storage.Transaction:
        if self.transaction is None:
            raise RuntimeError(f"{self.uri} is published with the transaction it was staged in")
        return self.transaction


def check_serialization_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Refuse, by name, keys that tensorizer's `TensorSerializer` does not take, and
    ``compress_tensors: true``: tensorizer 2.12 documents it as "Not implemented.
    Specifying this option does nothing", yet imports ``lz4`` for it (not a dependency:
    a ModuleNotFoundError traceback without it)."""
    from tensorizer import TensorSerializer

    accepted = set(inspect.signature(TensorSerializer.__init__).parameters) - {"self", "file_obj"}
    refused = {"encryption"}  # set by --keyfile
    unknown = sorted(set(kwargs) - (accepted - refused))
    if unknown:
        raise ConfigError(
            f"--serialization-kwargs: unknown or reserved key(s) {', '.join(map(repr, unknown))}; "
            f"TensorSerializer takes {', '.join(sorted(accepted - refused))}"
        )
    if kwargs.get("compress_tensors"):
        raise ConfigError(
            "--serialization-kwargs: compress_tensors is not implemented by tensorizer "
            "(its TensorSerializer writes the tensors uncompressed whatever it is set to); "
            "leave it out"
        )


IndexEntry = tuple[str, torch.dtype, int]  # (name, dtype, dimensions) of one tensor


def index_room(entries: Iterable[IndexEntry], *, uri: str) -> int:
    """The bytes tensorizer's index needs for the file record and `entries` (an upper
    bound), at least tensorizer's own 256 KiB: any tensor count fits (`compat.reserve_index`;
    tensorizer 2.12 alone stops at about 2,600 tensors with "Metadata overflow").

    Raises:
        ConfigError: a tensor tensorizer's format cannot hold (a name over 65,535 bytes, over
            255 dimensions), naming it and `uri`; checked before anything is written.
    """
    total = index_entry_bytes(RECORD_NAME, 8, 1)
    for name, dtype, dimensions in entries:
        if len(name.encode()) > MAX_NAME_BYTES or dimensions > MAX_DIMENSIONS:
            raise ConfigError(
                f"{uri}: tensor {name[:80]!r} cannot be written: tensorizer's format holds "
                f"names of at most {MAX_NAME_BYTES} bytes and at most {MAX_DIMENSIONS} "
                f"dimensions (it has {len(name.encode())} bytes, {dimensions} dimensions)"
            )
        # tensorizer's dtype string: numpy's name ("<f4", "<V2"), then for the dtypes
        # numpy lacks a separator and torch's name ("torch.bfloat16").
        total += index_entry_bytes(name, 5 + len(str(dtype)), dimensions)
    return max(DEFAULT_INDEX_BYTES, total)


def write_tensors(
    uri: str,
    tensors: Iterable[tuple[str, torch.Tensor, bool]],
    *,
    record: FileRecord,
    key: bytes | None = None,
    serialization_kwargs: Mapping[str, Any] | None = None,
    options: storage.Options = None,
    on_bytes: Callable[[int], None] | None = None,
    marker: bool = True,
    batch_bytes: int | None = None,
    tx: storage.Transaction | None = None,
    index: Iterable[IndexEntry] | None = None,
) -> StagedTensors:
    """Write `tensors` to a file staged at `uri` in transaction `tx` (published after the
    transaction's other files), or, without `tx`, in a transaction of its own that the
    returned `StagedTensors.commit()` publishes.

    Args:
        uri: the final location of the file.
        tensors: (name, tensor, is_buffer) triples, in the order to write them.
        record: the file record, written first: as the bytes of vLLM's marker tensor (see
            `format.record`, so that vLLM's built-in loader reads the file too), or, with
            ``marker=False``, as its own STATE_DICT tensor.
        key: a 32-byte key to encrypt with, or None.
        serialization_kwargs: extra keyword arguments for `TensorSerializer`.
        options: how to reach remote storage (for an ``s3://`` URI), when no `tx` is given.
        on_bytes: called with each tensor's size in bytes once it is written (core/progress.py).
        marker: write vLLM's ``.vllm_tensorized_marker`` (files of vLLM's own parameters);
            False for a checkpoint-form file (``convert``), which vLLM must not take for one.
        batch_bytes: write the tensors in batches of about this many bytes, hashed in
            parallel and prepared a batch ahead (`write_batches`), with tensorizer's
            ``STATE_DICT`` type; None writes them one by one as ``PARAM``/``BUFFER``.
        tx: the transaction to stage the file in. index: (name, dtype, dimensions) of each tensor, to size tensorizer's index
            (`index_room`); None: from `tensors` when a sequence, else 256 KiB.

    Returns:
        The staged file; nothing is at `uri` until its transaction commits.
    Raises:
        StorageError: the file cannot be written (named); nothing is left of it.
        ConfigError: what tensorizer cannot hold (`index_room`), before any write.
    """
    room = _checked_room(uri, tensors, record, index)
    how: dict[str, Any] = dict(room=room, record=record, key=key, on_bytes=on_bytes)
    how.update(serialization_kwargs=serialization_kwargs, marker=marker, batch_bytes=batch_bytes)
    if tx is not None:
        return _write_staged(StagedTensors(tx.stage(uri, last=True)), tensors, **how)
    own = storage.transaction(options)
    try:
        staged = _write_staged(StagedTensors(own.stage(uri, last=True)), tensors, **how)
    except BaseException:
        own.rollback()
        raise
    staged.transaction = own
    return staged


def _checked_room(
    uri: str,
    tensors: Iterable[tuple[str, torch.Tensor, bool]],
    record: FileRecord,
    index: Iterable[IndexEntry] | None,
) -> int:
    """`index_room` of the file `write_tensors` writes, its limits checked (ConfigError)."""
    if index is None and isinstance(tensors, Sequence):
        index = ((name, t.dtype, t.dim()) for name, t, _ in tensors)
    if len(record.to_bytes()) > MAX_RECORD_BYTES:  # readers refuse a larger one
        raise ConfigError(
            f"{storage.redact(uri)}: the file record would be {len(record.to_bytes())} bytes; "
            f"readers take at most {MAX_RECORD_BYTES}"
        )
    return index_room(index or (), uri=storage.redact(uri))


def _write_staged(
    staged: StagedTensors,
    tensors: Iterable[tuple[str, torch.Tensor, bool]],
    *,
    record: FileRecord,
    key: bytes | None,
    serialization_kwargs: Mapping[str, Any] | None,
    on_bytes: Callable[[int], None] | None,
    marker: bool,
    batch_bytes: int | None,
    room: int,
) -> StagedTensors:
    """`write_tensors` into the temporary file of `staged`, with `room` bytes of index."""
    from tensorizer.serialization import TensorType

    try:
        with open(staged.staged.path, "wb+") as f:
            serializer = _serializer(f, key, serialization_kwargs)
            reserve_index(serializer, room)
            # The record says whether the file is encrypted: set here, for every writer.
            record = dataclasses.replace(record, encrypted=key is not None)
            record_tensor = torch.frombuffer(bytearray(record.to_bytes()), dtype=torch.uint8)
            if marker:
                # vLLM's marker holds the record (see format.record): vLLM's built-in loader reads it.
                serializer.write_tensor(0, MARKER_NAME, TensorType.PARAM, record_tensor)
            else:
                # No marker (vLLM must not take the file for its own parameters): the record
                # keeps its own STATE_DICT tensor, which this package reads.
                serializer.write_tensor(0, RECORD_NAME, TensorType.STATE_DICT, record_tensor)
            if batch_bytes is not None:
                _write_batched(serializer, tensors, batch_bytes, staged, on_bytes)
                tensors = ()
            for index, (name, tensor, is_buffer) in enumerate(tensors, start=1):
                kind = TensorType.BUFFER if is_buffer else TensorType.PARAM
                serializer.write_tensor(index, name, kind, tensor)
                staged.tensors += 1
                staged.bytes += tensor.numel() * tensor.element_size()
                if on_bytes is not None:
                    on_bytes(tensor.numel() * tensor.element_size())
            serializer.close()
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot write {staged.uri}: {e.strerror or e}") from e
    return staged


def _serializer(f: Any, key: bytes | None, serialization_kwargs: Mapping[str, Any] | None) -> Any:
    """tensorizer's `TensorSerializer` writing to `f`.

    Raises:
        ConfigError: tensorizer refuses a value of `serialization_kwargs` (its TypeError or
            ValueError, e.g. ``limit_cpu_concurrency: 0``), naming ``--serialization-kwargs``.
    """
    from tensorizer import TensorSerializer

    try:
        return TensorSerializer(
            f,
            encryption=encryption_params(key) if key is not None else None,
            **dict(serialization_kwargs or {}),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--serialization-kwargs: {e}") from None


def _write_batched(
    serializer: Any,
    tensors: Iterable[tuple[str, torch.Tensor, bool]],
    batch_bytes: int,
    staged: StagedTensors,
    on_bytes: Callable[[int], None] | None,
) -> None:
    def written(count: int, nbytes: int) -> None:
        staged.tensors += count
        staged.bytes += nbytes
        if on_bytes is not None:
            on_bytes(nbytes)

    write_batches(
        serializer,
        ((name, tensor) for name, tensor, _ in tensors),
        batch_bytes=batch_bytes,
        on_batch=written,
    )
