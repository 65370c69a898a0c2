"""Reading parts of tensors: given each tensor's needed byte range, read only those bytes
(local ``pread``, one HTTP/S3 range request each), in parallel and a bounded window ahead.

A part with targets (the rank's parameters, or rows or columns of them) goes into them:
read in place when plain, of the stored dtype and not in column tiles; otherwise piece by
piece (about `PIECE_BYTES`) through one reused buffer per reading thread, decrypted, then
copied with ``copy_`` (which casts as vLLM's weight loaders' copy would; rows of a column
tile into the parameter's columns). Memory beyond the parameters is then the
reading threads' piece buffers, whatever the part's size. A part without targets lands in
a fresh buffer of the tensor's full stored size, filled only over the range read: the
rest is never touched, so on the CPU its pages are never made resident. In an encrypted
file a range is widened to whole cipher chunks, and each chunk is checked and decrypted on
its own (`read.decrypt`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .. import storage
from ..core.errors import StorageError
from .checks import truncated, wrong_key_errors
from .memory import byte_view, make_present, populate, read_rows
from .parts import Part, PartsRead
from .scatter import read_scattered, read_tiles_scattered
from .source import ByteSource, LocalSource, RemoteSource

__all__ = ["read_parts", "ranged_source", "open_source"]

PIECE_BYTES = 8 << 20  # one read request
# Reads of a local file smaller than this go to the reading threads in batches of about
# BATCH_BYTES (at most BATCH_READS): one task per read cost 0.25 ms of the submitting
# thread's time (the GIL handed back and forth), 4.9 s for the 18,867 tensors of a
# Qwen3-MoE-shaped checkpoint (benchmarks/moe.py).
SMALL_BYTES = 1 << 20
BATCH_BYTES = 8 << 20
BATCH_READS = 512
WINDOW_BYTES = 64 << 20  # bytes read ahead of the tensor being handed over (peak memory:
# a part larger than this is read alone, so buffers hold at most max(this, one part))


def ranged_source(uri: str, options: storage.Options) -> Any:
    """`storage.range_source` of a remote converted file, which must serve byte ranges.

    Raises:
        StorageError: the server does not serve byte ranges (naming the file).
    """
    source = storage.range_source(uri, options)
    if not source.supports_ranges:
        raise StorageError(
            f"cannot read {source.name}: the server does not serve byte ranges (HTTP Range "
            "requests), which loading a converted file needs (each rank reads only its "
            "parts); serve it from a server that does, or download it and load the local copy"
        )
    return source


def open_source(uri: str, options: storage.Options) -> LocalSource | RemoteSource:
    """The converted file at `uri`: a local one read by ``preadv``, a remote one by byte
    ranges (`ranged_source`: refused where its server does not serve them)."""
    path = storage.local_path(uri)
    if path is not None:
        return LocalSource(path, uri)
    return RemoteSource(ranged_source(uri, options))


def _fill(
    reader: ByteSource, part: Part, memory: torch.Tensor, place: int, lo: int, hi: int
) -> None:
    """Read the tensor's bytes [lo, hi) into the uint8 CPU tensor `memory` at byte `place`
    (and decrypt them in place when the part is encrypted)."""
    populate(memory.data_ptr() + place, hi - lo)  # its pages made present in one call
    view = byte_view(memory)[place : place + hi - lo]
    reader.read_into(part.entry.data_offset + lo, view, part.name)
    if part.cipher is not None:
        with wrong_key_errors(reader.name, tensor=part.name):
            part.cipher.decrypt(view, lo)


class _Batches:
    """Small reads of a local file, run by the reading threads a batch per task; each
    read's future is its batch's. `flush` before waiting on any of them."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.calls: list[tuple[Any, ...]] = []
        self.bytes = 0
        self.future: Future = Future()

    def add(self, *call: Any, nbytes: int) -> Future:
        future = self.future
        self.calls.append(call)
        self.bytes += nbytes
        if self.bytes >= BATCH_BYTES or len(self.calls) >= BATCH_READS:
            self.flush()
        return future

    def flush(self) -> None:
        if self.calls:
            self.pool.submit(_run_batch, self.future, self.calls)
            self.calls, self.bytes, self.future = [], 0, Future()


def _run_batch(future: Future, calls: list[tuple[Any, ...]]) -> None:
    """Run a batch of small reads of one local file: the plain ones (`_fill`) by few
    ``preadv`` calls for all of them (`scatter`; each alone where that reads short), the
    others (`_fill_piece` of whole column tiles) read together too, then copied into
    their columns (`scatter.read_tiles_scattered`)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        plain = [call for call in calls if call[0] is _fill]
        reads = [
            (part.entry.data_offset + lo, hi - lo, memory, place)
            for _, _, part, memory, place, lo, hi in plain
        ]
        if plain:
            read_scattered(plain[0][1].fd, reads, lambda i: plain[i][0](*plain[i][1:]))
        tiled = [call for call in calls if call[0] is not _fill]  # whole column tiles
        if tiled:
            tiles = [(p.entry.data_offset + lo, hi - lo, t, p) for _, _, p, lo, hi, t, *_ in tiled]
            read_tiles_scattered(tiled[0][1].fd, tiles, lambda i: tiled[i][0](*tiled[i][1:]))
    except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the batch
        future.set_exception(e)
    else:
        future.set_result(None)


def _submit_direct(
    pool: ThreadPoolExecutor, reader: ByteSource, part: Part, batches: _Batches
) -> list[Future]:
    """Read each target's bytes into its tensor, in pieces: straight there, or each piece
    through a buffer of its own size (`_fill_through`); a small read of a local file in a
    batch (`_Batches`)."""
    futures = []
    for lo, hi, tensor in part.targets:
        if not part.through_buffer(tensor):
            flat = tensor.view(-1).view(torch.uint8)
            if reader.local and hi - lo < SMALL_BYTES:
                futures.append(batches.add(_fill, reader, part, flat, 0, lo, hi, nbytes=hi - lo))
                continue
            for at in range(lo, hi, PIECE_BYTES):
                futures.append(
                    pool.submit(_fill, reader, part, flat, at - lo, at, min(hi, at + PIECE_BYTES))
                )
            continue
        bounds = _piece_bounds(part, lo, hi)
        straight = reader.local and part.only_tiled(tensor)
        if straight and len(bounds) == 2 and hi - lo < SMALL_BYTES:  # an expert's down_proj
            futures.append(
                batches.add(_fill_piece, reader, part, lo, hi, tensor, lo, True, nbytes=hi - lo)
            )
            continue
        for a, b in zip(bounds, bounds[1:]):
            futures.append(pool.submit(_fill_piece, reader, part, a, b, tensor, lo, straight))
    return futures


def _fill_piece(
    reader: ByteSource, part: Part, a: int, b: int, tensor: torch.Tensor, lo: int, straight: bool
) -> None:
    """One piece [a, b) of a target starting at stored byte `lo`: rows of tiles read
    straight into `tensor`'s columns (`straight`, `_fill_rows`), else through a buffer
    (`_fill_through`). The first piece first makes the whole target's pages present (a
    reading thread, not the submitting one, pays for it)."""
    if a == lo:
        make_present(tensor)
    if not straight or not _fill_rows(reader, part, a, b, tensor, lo):
        _fill_through(reader, part, a, b, tensor, lo)


def _piece_bounds(part: Part, lo: int, hi: int) -> list[int]:
    """Where the stored bytes [lo, hi) are cut into pieces of about `PIECE_BYTES`: at
    whole elements, or at whole rows of column tiles (a piece may run on into the next
    tile); at whole cipher chunks where that allows (no chunk read twice)."""
    unit = part.dtype.itemsize * (part.tile_row if part.tiles else 1)
    # where a unit divides a chunk, chunk multiples (counted from byte 0, as `lo` is a
    # whole unit) are whole units: cut there
    if part.cipher is not None and part.cipher.chunk_size % unit == 0:
        size = part.cipher.chunk_size
        step = max(1, PIECE_BYTES // size) * size
        first = (lo // step + 1) * step
        return [lo, *range(first, hi, step), hi]
    step = max(1, PIECE_BYTES // unit) * unit
    return [*range(lo, hi, step), hi]


_scratches = threading.local()


def _scratch(size: int) -> torch.Tensor:
    """`size` bytes of this thread's piece buffer, kept for its next piece (a fresh buffer
    per piece would leave freed pieces in the allocator's per-thread arenas, resident)."""
    held = getattr(_scratches, "piece", None)
    if held is None or held.numel() < size:
        _scratches.piece = None
        # at the most a piece and the cipher chunks around it
        held = torch.empty(max(size, PIECE_BYTES + (4 << 20)), dtype=torch.uint8)
        _scratches.piece = held
    return held[:size]


def _fill_through(
    reader: ByteSource, part: Part, a: int, b: int, tensor: torch.Tensor, lo: int
) -> None:
    """Read (and decrypt) the stored bytes [a, b) of a target whose bytes start at stored
    byte `lo` into a buffer of their own size, and copy them into `tensor` (``copy_``:
    cast to its dtype; rows of a column tile into its columns)."""
    s0, s1 = part.span_of(a, b)
    scratch = _scratch(s1 - s0)
    _fill(reader, part, scratch, 0, s0, s1)
    piece = scratch[a - s0 : b - s0].view(part.dtype)
    if not part.tiles:
        first = (a - lo) // part.dtype.itemsize
        tensor.view(-1)[first : first + piece.numel()].copy_(piece)
        return
    rows = piece.view(-1, part.tile_row)
    for columns, first, count in _tile_rows(part, a - lo, rows.shape[0], tensor):
        columns.copy_(rows[first : first + count])


def _fill_rows(
    reader: ByteSource, part: Part, a: int, b: int, tensor: torch.Tensor, lo: int
) -> bool:
    """Read the stored bytes [a, b) of a plain tiled target (whole rows of column tiles,
    `lo` its first tile's start) from a local file straight into `tensor`'s columns
    (`read.memory.read_rows`: one ``preadv`` of many rows). False, having read nothing,
    where that cannot be called (the caller reads through a buffer)."""
    assert isinstance(reader, LocalSource)  # `straight` reads are of local files only
    width = part.tile_row * part.dtype.itemsize
    for columns, first, _ in _tile_rows(part, a - lo, (b - a) // width, tensor):
        offset = part.entry.data_offset + a + first * width
        try:
            if not read_rows(reader.fd, columns.view(torch.uint8), offset):
                return False
        except EOFError:
            raise truncated(reader.name, part.name) from None
    return True


def _tile_rows(
    part: Part, at: int, count: int, tensor: torch.Tensor
) -> Iterator[tuple[torch.Tensor, int, int]]:
    """For `count` rows of column tiles from stored byte `at` of a target (from its first
    tile's start): (the columns of `tensor` they go into, index of the first of those
    rows, how many), one per tile they touch. Row i of tile j is row i of the tile's
    columns [j * width, (j + 1) * width) of `tensor`."""
    out, width = part.shape[0], part.tile_row
    first_row, done = at // (width * part.dtype.itemsize), 0
    while done < count:
        tile, row = divmod(first_row + done, out)
        n = min(count - done, out - row)
        yield tensor[row : row + n, tile * width : (tile + 1) * width], done, n
        done += n


def _target_bytes(part: Part) -> int:
    """The bytes `_submit_direct` reads for `part`'s targets."""
    total = 0
    for lo, hi, tensor in part.targets:
        if not part.through_buffer(tensor):
            total += hi - lo
            continue
        bounds = _piece_bounds(part, lo, hi)
        for a, b in zip(bounds, bounds[1:]):
            s0, s1 = part.span_of(a, b)
            total += s1 - s0
    return total


def _size(part: Part) -> int:
    """The bytes a part holds in memory while it waits: its read span in a buffer; nothing
    when it goes into its targets (memory that exists already; pieces that pass through a
    buffer use the reading thread's own), so those parts are all read at once, not a
    window at a time (2 GB at TP=1: 0.46-0.49 s against 0.49-0.54 s windowed)."""
    return 0 if part.targets else part.span[1] - part.span[0]


def _submit(
    pool: ThreadPoolExecutor, reader: ByteSource, part: Part, batches: _Batches
) -> tuple[torch.Tensor | None, list[Future], int]:
    """Start reading `part`: (its buffer, None with targets; the reads; bytes read)."""
    if part.targets:
        return None, _submit_direct(pool, reader, part, batches), _target_bytes(part)
    buffer = torch.empty(part.entry.data_length, dtype=torch.uint8)
    lo, hi = part.span
    step = PIECE_BYTES
    if part.cipher is not None:  # pieces of whole chunks
        step = max(1, PIECE_BYTES // part.cipher.chunk_size) * part.cipher.chunk_size
    futures = [
        pool.submit(_fill, reader, part, buffer, at, at, min(hi, at + step))
        for at in range(lo, hi, step)
    ]
    return buffer, futures, hi - lo


def read_parts(
    uri: str,
    parts: Sequence[Part],
    *,
    threads: int,
    options: storage.Options = None,
    stats: PartsRead | None = None,
) -> Iterator[tuple[Part, torch.Tensor | None]]:
    """Yield (part, buffer) in the order of `parts`: `buffer` is a uint8 CPU tensor of the
    tensor's stored length whose bytes [part.span) are read (and decrypted); None for a part
    with `targets`, whose bytes are then already in those tensors.

    Raises:
        StorageError: the file cannot be read.
        FormatError: it ends before a part does.
        EncryptionError: a chunk fails its check.
    """
    stats = stats if stats is not None else PartsRead()
    reader = open_source(uri, options)
    pool = ThreadPoolExecutor(max(1, threads))
    batches = _Batches(pool)
    pending: collections.deque[tuple[Part, torch.Tensor | None, list[Future]]] = collections.deque()
    queued = 0
    todo = iter(parts)
    part = next(todo, None)
    try:
        while True:
            # read ahead while the window holds the next part too (one part at least)
            while part is not None and (not pending or queued + _size(part) <= WINDOW_BYTES):
                buffer, futures, nbytes = _submit(pool, reader, part, batches)
                pending.append((part, buffer, futures))
                queued += _size(part)
                stats.bytes += nbytes
                stats.requests += len(futures)
                part = next(todo, None)
            batches.flush()  # before waiting on any read
            if not pending:
                return
            done, buffer, futures = pending.popleft()
            for future in futures:
                future.result()
            queued -= _size(done)
            yield done, buffer
            del buffer  # the caller's now: not kept alive here while the next is read
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e}") from None
    finally:
        batches.future.cancel()
        for _, _, futures in pending:
            for future in futures:
                future.cancel()
        pool.shutdown(wait=True)
        reader.close()
