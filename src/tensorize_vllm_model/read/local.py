"""Reading a local tensors file onto a device: parallel reads into memory whose pages
are made present first (CPU), or into a few reused pinned buffers copied on (CUDA).

A fresh tensor's pages are not yet in memory; a ``read()`` into it takes each page's
first-touch fault inside the kernel's copy, which is slow on virtual machines. Asking the
kernel to make a piece's pages present in one call (``MADV_POPULATE_WRITE``), then reading
into it, beat a bare ``readinto`` of the same file (warm) and tensorizer's reader (cold) in
alternating measurements (docs/performance.md and its archive). Onto a GPU, each reader thread reads into
its own two pinned staging buffers in turn and copies each filled buffer to the tensors on its
own CUDA stream while it reads the next: no page is faulted in after the first buffer, and
host memory stays at readers x 2 x STAGING_BYTES. An encrypted tensor is read one cipher
chunk at a time, and the reading thread decrypts each chunk right after reading it
(`read.decrypt`). Local files into CPU memory (hash checks included: `LocalEngine` checks
the tensors read here against their stored hashes, `format.hashes`) and onto a GPU without
hash checks take this path; the index has been checked against the file's length
(`format.header.check_index`) before anything here runs. The staged (GPU) path is the same
engine with another copy loop (`_Staged`), chosen by the device.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import FormatError, StorageError
from .base import OpenFile, ReadTimes

if TYPE_CHECKING:
    from .decrypt import TensorCipher

__all__ = [
    "LocalEngine",
    "Span",
    "ReadTimes",
    "read_spans",
    "populate",
    "read_rows",
    "byte_view",
    "STAGING_BYTES",
    "STAGING_BUFFERS",
    "STAGING_STREAMS",
    "READ_AHEAD_BYTES",
]

PIECE_BYTES = 16 << 20  # pages made present per call; 16 to 128 MiB measured alike
STAGING_BYTES = 8 << 20  # one pinned staging buffer
STAGING_BUFFERS = 2  # staging buffers per reader thread (2 or more: one fills, one copies)
STAGING_STREAMS = 1  # CUDA streams per reader thread (buffer k copies on stream k mod this)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_POPULATE_WRITE = 23  # Linux 5.14+


@dataclass(frozen=True)
class Span:
    """One tensor's bytes in the file and what they become."""

    name: str
    offset: int
    length: int  # 0 for a tensor stored without data (it reads back as zeros)
    dtype: torch.dtype
    shape: tuple[int, ...]
    cipher: TensorCipher | None = None  # how its bytes are encrypted, if they are


def read_spans(
    path: str,
    spans: Sequence[Span],
    threads: int,
    *,
    name: str | None = None,
    device: str | torch.device = "cpu",
    staged: bool | None = None,
    times: ReadTimes | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Read every span of the file at `path` into a new tensor on `device`, with `threads`
    readers, through staging buffers when `staged` (by default, on devices other than the
    CPU). Where the readers spent their time is added to `times`, when given; `on_bytes` is
    called (from the reader threads) with the size of each piece once it is read.

    Raises:
        StorageError: the file cannot be read.
        FormatError: it ends before a span does (it changed after its index was checked).
        format.compat.DecryptionFailed: an encrypted span fails its check.
    """
    name = name or path
    device = torch.device(device)
    staged = device.type != "cpu" if staged is None else staged
    step = min(PIECE_BYTES, STAGING_BYTES) if staged else PIECE_BYTES
    tensors = []
    pieces: list[_Piece] = []
    for span in spans:
        size = _byte_size(span)
        if span.length == 0:
            tensors.append(torch.zeros(span.shape, dtype=span.dtype, device=device))
            continue
        if span.length != size:
            raise FormatError(
                f"{name} is corrupt: tensor {span.name} holds {span.length} "
                f"bytes where its shape and dtype need {size}"
            )
        memory = torch.empty(size, dtype=torch.uint8, device=device)
        tensors.append(memory.view(span.dtype).reshape(span.shape))
        # An encrypted tensor is read one cipher chunk at a time, decrypted while its bytes
        # are still in the CPU's cache (on 2 vCPUs, 2 MiB reads of a warm file loaded at
        # 1.16-1.45 GB/s against 1.06-1.36 for 16 MiB reads, in alternating runs).
        span_step = span.cipher.chunk_size if span.cipher else step
        for start in range(0, size, span_step):
            pieces.append((span, memory, start, min(size, start + span_step)))
    runs = _split(pieces, threads)
    read = (_Staged(path, name, device) if staged else _Direct(path, name)).read
    if on_bytes is not None:
        read = functools.partial(read, on_bytes=on_bytes)
    if times is not None:
        times.readers = len(runs)
    try:
        with ThreadPoolExecutor(len(runs)) as pool:
            for spent in pool.map(read, runs):
                if times is not None:
                    times.add(spent)
    except OSError as e:
        raise StorageError(f"cannot read {name}: {e}") from None
    return tensors


_Piece = tuple[Span, torch.Tensor, int, int]  # span, its tensor's bytes, [start, end)


def _split(pieces: list[_Piece], threads: int) -> list[list[_Piece]]:
    """Contiguous runs of the file, about equal in bytes, one per reader thread."""
    total = sum(end - start for _, _, start, end in pieces)
    runs: list[list[_Piece]] = [[]]
    done = 0
    for piece in pieces:
        if done >= total * len(runs) / max(1, threads) and runs[-1]:
            runs.append([])
        runs[-1].append(piece)
        done += piece[3] - piece[2]
    return runs


def _read_exactly(fd: int, view: memoryview, offset: int, span: Span, name: str) -> None:
    got = 0
    while got < len(view):
        count = os.preadv(fd, [view[got:]], offset + got)
        if count == 0:
            raise FormatError(
                f"{name} is truncated: tensor {span.name} ends past the end of the file"
            )
        got += count


class _Direct:
    """Reads straight into CPU tensors, each piece's pages made present first."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name

    def read(self, run: list[_Piece], on_bytes: Callable[[int], None] | None = None) -> ReadTimes:
        # One descriptor per run, read in order: the kernel's readahead sees a sequential
        # reader (pieces interleaved across threads on one descriptor read cold files slower).
        spent = ReadTimes()
        clock = time.perf_counter
        with open(self.path, "rb", buffering=0) as f:
            ahead = _ReadAhead(f.fileno(), run)
            for index, (span, memory, start, end) in enumerate(run):
                ahead.past(index)
                began = clock()
                populate(memory.data_ptr() + start, end - start)
                populated = clock()
                view = byte_view(memory)[start:end]
                _read_exactly(f.fileno(), view, span.offset + start, span, self.name)
                read = clock()
                spent.populating += populated - began
                spent.reading += read - populated
                if span.cipher:
                    span.cipher.decrypt(view, start)
                    spent.decrypting += clock() - read
                if on_bytes is not None:
                    on_bytes(end - start)
        return spent


# Bytes of a run asked of the disk ahead of the piece being read (``POSIX_FADV_WILLNEED``).
READ_AHEAD_BYTES = 32 << 20


class _ReadAhead:
    """Keeps the disk busy while a reader makes its next piece's pages present: the bytes
    of the pieces that follow the one it reads, up to `READ_AHEAD_BYTES`, are asked of the
    kernel (``posix_fadvise(WILLNEED)``: the reads are queued, not waited for). A warm file
    costs one cheap call per piece; where the call is missing, nothing is asked."""

    def __init__(self, fd: int, run: list[_Piece]):
        self.fd, self.run, self.asked = fd, run, 0  # pieces asked for so far
        self.ends = list(itertools.accumulate(end - start for _, _, start, end in run))
        self.enabled = READ_AHEAD_BYTES > 0 and hasattr(os, "posix_fadvise")

    def past(self, index: int) -> None:
        """Piece `index` is about to be read: ask for it and for what follows it."""
        if not self.enabled:
            return
        limit = self.ends[index] + READ_AHEAD_BYTES
        while self.asked < len(self.run) and (
            self.asked <= index or self.ends[self.asked] <= limit
        ):
            span, _, start, end = self.run[self.asked]
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, span.offset + start, end - start, os.POSIX_FADV_WILLNEED)
            self.asked += 1


class _Staged:
    """Reads into a ring of `STAGING_BUFFERS` reused staging buffers per run and copies each
    filled buffer onto the device: on CUDA, page-locked buffers and asynchronous copies on
    `STAGING_STREAMS` CUDA streams of the run's own (buffer k on stream k mod streams), a
    buffer refilled only once its copies are done. On the CPU (where tests check the
    bookkeeping), plain buffers and copies."""

    def __init__(self, path: str, name: str, device: torch.device):
        self.path, self.name, self.device = path, name, device
        self.cuda = device.type == "cuda"

    def read(self, run: list[_Piece], on_bytes: Callable[[int], None] | None = None) -> ReadTimes:
        # An encrypted tensor's piece is one cipher chunk, which may be larger.
        size = max(
            min(STAGING_BYTES, sum(end - start for _, _, start, end in run)),
            max((end - start for _, _, start, end in run), default=0),
        )
        count = max(2, STAGING_BUFFERS)
        ring = _Ring(
            [torch.empty(size, dtype=torch.uint8) for _ in range(count)], self.device, self.cuda
        )
        spent = ReadTimes()
        clock = time.perf_counter
        try:
            with open(self.path, "rb", buffering=0) as f:
                for span, memory, start, end in run:
                    length = end - start
                    view = ring.room(length)
                    began = clock()
                    _read_exactly(f.fileno(), view, span.offset + start, span, self.name)
                    read = clock()
                    spent.reading += read - began
                    if span.cipher:
                        span.cipher.decrypt(view, start)
                        spent.decrypting += clock() - read
                    ring.filled(memory[start:end], length)
                    if on_bytes is not None:
                        on_bytes(length)
                ring.send()
            return spent
        finally:
            ring.close()


class _Ring:
    """A reader's staging buffers, filled in turn: `room` gives the next bytes to read
    into (sending the current buffer when it is full, and waiting for the copies of the one
    it moves to), `filled` records where those bytes go, `send` copies a buffer's pieces
    onto the device (asynchronously on CUDA)."""

    def __init__(self, buffers: list[torch.Tensor], device: torch.device, cuda: bool):
        self.buffers, self.cuda = buffers, cuda
        self.pinned = [_pin(b) for b in buffers] if cuda else []
        self.views = [byte_view(b) for b in buffers]
        self.streams = (
            [torch.cuda.Stream(device) for _ in range(max(1, min(STAGING_STREAMS, len(buffers))))]
            if cuda
            else []
        )
        self.done: list[Any] = [None] * len(buffers)  # each buffer's copies, as a CUDA event
        self.which, self.used = 0, 0
        self.pending: list[tuple[torch.Tensor, int, int]] = []

    def room(self, length: int) -> memoryview:
        if self.used + length > self.buffers[0].numel():
            self.send()
            self.which, self.used = (self.which + 1) % len(self.buffers), 0
            if self.done[self.which] is not None:
                self.done[self.which].synchronize()
        return self.views[self.which][self.used : self.used + length]

    def filled(self, target: torch.Tensor, length: int) -> None:
        self.pending.append((target, self.used, length))
        self.used += length

    def send(self) -> None:
        stream = self.streams[self.which % len(self.streams)] if self.streams else None
        buffer = self.buffers[self.which]
        with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
            for target, at, length in self.pending:
                target.copy_(buffer[at : at + length], non_blocking=self.cuda)
        self.done[self.which] = stream.record_event() if stream else None
        self.pending.clear()

    def close(self) -> None:
        for stream in self.streams:
            stream.synchronize()  # the buffers go back only once nothing reads them
        for buffer, registered in zip(self.buffers, self.pinned):
            if registered:
                torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock `buffer` for asynchronous copies to the GPU: its pages made present, then
    registered with CUDA (half the time of a pinned allocation of the same size, measured
    on an H100: docs/performance.md). False where CUDA refuses: the copies then wait for
    each piece, and the bytes are the same."""
    populate(buffer.data_ptr(), buffer.numel())
    try:
        return int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) == 0
    except Exception:  # noqa: BLE001 - no CUDA runtime here, or it refused
        return False


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 CPU tensor, writable, without a copy."""
    return memoryview(tensor.numpy())  # type: ignore[arg-type]  # numpy arrays are buffers


def _byte_size(span: Span) -> int:
    return math.prod(span.shape) * span.dtype.itemsize


def populate(address: int, length: int) -> None:
    """Make the whole pages of [address, address + length) present and writable, in one
    call; without the call (other systems, old kernels) each page faults in on first write."""
    global _madvise
    if _madvise is False:
        return
    start = -(-address // _PAGE) * _PAGE
    end = (address + length) // _PAGE * _PAGE
    if end > start and _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        _madvise = False  # not supported here: stop asking


def _libc(name: str, argtypes: list, restype: Any) -> Any:
    """The C library's function `name` (Linux), typed; None where it cannot be had."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = restype
    return function


_madvise: Any = (
    _libc("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int) or False
)

_IOV_MAX = 1024  # iovecs per preadv call (Linux UIO_MAXIOV)


def read_rows(fd: int, rows: torch.Tensor, offset: int) -> bool:
    """Read the file's bytes from `offset` on into the rows of `rows`, a 2-D CPU tensor
    whose rows are contiguous but need not follow one another (columns of a wider
    tensor): one ``preadv`` of up to `_IOV_MAX` rows at a time, straight into the rows,
    with no buffer. False where the C library's ``preadv`` cannot be called (the caller
    reads through a buffer instead).

    Raises:
        OSError: the read failed.
        EOFError: the file ends before the last row.
    """
    import numpy as np

    function = _preadv
    if function is None or rows.numel() == 0:
        return function is not None
    count, width = rows.shape[0], rows.shape[1] * rows.element_size()
    iovecs = np.empty((count, 2), dtype=np.uint64)
    iovecs[:, 0] = rows.data_ptr() + np.arange(count, dtype=np.uint64) * (
        rows.stride(0) * rows.element_size()
    )
    iovecs[:, 1] = width
    for first in range(0, count, _IOV_MAX):
        n = min(_IOV_MAX, count - first)
        address = iovecs.ctypes.data + first * iovecs.strides[0]
        got = function(fd, address, n, offset + first * width)
        if got < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        if got != n * width:  # a regular file returns less only at its end
            raise EOFError(offset + first * width + got)
    return True


_preadv = _libc(
    "preadv", [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long], ctypes.c_ssize_t
)


class LocalEngine:
    """A local file read by `read_spans` (into CPU memory, or onto a GPU through staging
    buffers), decrypted chunk by chunk as it is read (`read.decrypt`), each tensor checked
    against its stored hashes with ``verify_hash`` (CPU only: `read.reader.choose_engine`).
    Where a dtype has no torch equivalent or an encrypted tensor's header is not as
    expected, tensorizer's reader takes the file (`read.tensorizer`)."""

    def __init__(self, path: str):
        self.path = path
        self.read_times: ReadTimes | None = None

    def items(
        self,
        file: OpenFile,
        chosen: list[tuple[str, Any]],
        on_bytes: Callable[[int], None] | None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        from ..format.compat import DecryptionFailed, wrong_key

        spans = self.spans(file, chosen)
        if spans is None:
            from .tensorizer import TensorizerEngine

            yield from TensorizerEngine(remote=False).items(file, chosen, on_bytes)
            return
        self.read_times = ReadTimes()
        try:
            tensors = read_spans(
                self.path,
                spans,
                file.kwargs["num_readers"],
                name=file.name,
                device=file.request.device,
                times=self.read_times,
                on_bytes=on_bytes,
            )
        except DecryptionFailed:
            raise wrong_key(file.name, file.request.keyfile) from None
        if file.kwargs["verify_hash"]:
            self._check_hashes(file, chosen, spans, tensors)
        for span, tensor in zip(spans, tensors):
            yield span.name, tensor

    def spans(
        self, file: OpenFile, chosen: list[tuple[str, Any]] | None = None
    ) -> list[Span] | None:
        """The tensors `chosen` (by default, all) to read as file spans, each with its cipher
        in an encrypted file; None when a dtype has no torch equivalent or an encrypted
        tensor's header is not as expected."""
        if chosen is None:
            chosen = file.entries()
        from ..format.header import torch_dtype
        from .decrypt import ciphers as read_ciphers

        found: list[Any] = [None] * len(chosen)
        if file.facts.encrypted:
            read = read_ciphers(self.path, [e for _, e in chosen], file.header)
            if read is None:
                return None
            found = read
        spans = []
        for (name, entry), cipher in zip(chosen, found):
            dtype = torch_dtype(entry.dtype)
            if dtype is None:
                return None
            spans.append(
                Span(
                    name=name,
                    offset=entry.data_offset,
                    length=entry.data_length,
                    dtype=dtype,
                    shape=tuple(int(d) for d in entry.shape),
                    cipher=cipher,
                )
            )
        return spans

    def _check_hashes(
        self,
        file: OpenFile,
        chosen: list[tuple[str, Any]],
        spans: list[Span],
        tensors: list[torch.Tensor],
    ) -> None:
        """Check tensors read into CPU memory against their stored hashes.

        Raises:
            CorruptTensorError: naming the first tensor that fails.
        """
        from ..format.compat import header_parse_errors
        from ..format.hashes import stored_hashes
        from ..format.header import pread_each

        places = [(e.offset, e.data_offset - e.offset) for _, e in chosen]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raws = pread_each(fd, places)
        finally:
            os.close(fd)
        for span, tensor, raw in zip(spans, tensors, raws):
            with header_parse_errors(file.name, span.name):
                hashes = stored_hashes(raw, file.header)
            data = byte_view(tensor.reshape(-1).view(torch.uint8)) if span.length else b""
            hashes.check(data, tensor=span.name, uri=file.name)
