"""Reading a local tensors file onto a device: parallel reads, each reader thread a
contiguous run of the file on its own `read.source.LocalSource`, into memory whose pages
are made present first (CPU: `read.memory.populate`), or through a few reused pinned
buffers copied on (CUDA: the same engine with another copy loop, `read.staged`, chosen by
the device). An encrypted tensor is read one cipher chunk at a time, and the reading
thread decrypts each chunk right after reading it (`read.decrypt`). Local files into CPU
memory (hash checks included: `LocalEngine` checks the tensors read here against their
stored hashes, `format.hashes`) and onto a GPU without hash checks take this path; the
index has been checked against the file's length (`format.header.check_index`) before
anything here runs.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import FormatError, StorageError
from . import staged as staging
from .base import OpenFile, ReadTimes
from .checks import stored_hashes, wrong_key_errors
from .memory import byte_view, populate
from .source import LocalSource

if TYPE_CHECKING:
    from .decrypt import TensorCipher

__all__ = [
    "LocalEngine",
    "Span",
    "ReadTimes",
    "read_spans",
    "READ_AHEAD_BYTES",
]

PIECE_BYTES = 16 << 20  # pages made present per call; 16 to 128 MiB measured alike


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
    step = min(PIECE_BYTES, staging.STAGING_BYTES) if staged else PIECE_BYTES
    tensors = []
    pieces: list[Piece] = []
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
    read = (staging.Staged(path, name, device) if staged else _Direct(path, name)).read
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


Piece = tuple[Span, torch.Tensor, int, int]  # span, its tensor's bytes, [start, end)


def _split(pieces: list[Piece], threads: int) -> list[list[Piece]]:
    """Contiguous runs of the file, about equal in bytes, one per reader thread."""
    total = sum(end - start for _, _, start, end in pieces)
    runs: list[list[Piece]] = [[]]
    done = 0
    for piece in pieces:
        if done >= total * len(runs) / max(1, threads) and runs[-1]:
            runs.append([])
        runs[-1].append(piece)
        done += piece[3] - piece[2]
    return runs


class _Direct:
    """Reads straight into CPU tensors, each piece's pages made present first."""

    def __init__(self, path: str, name: str):
        self.path, self.name = path, name

    def read(self, run: list[Piece], on_bytes: Callable[[int], None] | None = None) -> ReadTimes:
        # One descriptor per run, read in order: the kernel's readahead sees a sequential
        # reader (pieces interleaved across threads on one descriptor read cold files slower).
        spent = ReadTimes()
        clock = time.perf_counter
        with LocalSource(self.path, self.name) as source:
            ahead = _ReadAhead(source.fd, run)
            for index, (span, memory, start, end) in enumerate(run):
                ahead.past(index)
                began = clock()
                populate(memory.data_ptr() + start, end - start)
                populated = clock()
                view = byte_view(memory)[start:end]
                source.read_into(span.offset + start, view, span.name)
                read = clock()
                spent.populating += populated - began
                spent.reading += read - populated
                if span.cipher:
                    span.cipher.decrypt(view, start)
                    spent.decrypting += clock() - read
                if on_bytes is not None:
                    on_bytes(end - start)
        return spent


# Bytes of a run asked of the disk ahead of the piece being read (``POSIX_FADV_WILLNEED``);
# 0: off. Off by default: on a quiet machine, cold reads of `make bench`'s 0.75 GB file were
# faster without it in 14 of 15 alternating pairs (32 MiB: 1.27 GB/s, off: 1.73, median of
# 7; docs/performance.md, "Cold local reads"); it led only on a machine loaded by others.
READ_AHEAD_BYTES = 0


class _ReadAhead:
    """Keeps the disk busy while a reader makes its next piece's pages present: the bytes
    of the pieces that follow the one it reads, up to `READ_AHEAD_BYTES`, are asked of the
    kernel (``posix_fadvise(WILLNEED)``: the reads are queued, not waited for). A warm file
    costs one cheap call per piece; where the call is missing, nothing is asked."""

    def __init__(self, fd: int, run: list[Piece]):
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


def _byte_size(span: Span) -> int:
    return math.prod(span.shape) * span.dtype.itemsize


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
        spans = self.spans(file, chosen)
        if spans is None:
            from .tensorizer import TensorizerEngine

            yield from TensorizerEngine(remote=False).items(file, chosen, on_bytes)
            return
        self.read_times = ReadTimes()
        with wrong_key_errors(file.name, file.request.keyfile):
            tensors = read_spans(
                self.path,
                spans,
                file.kwargs["num_readers"],
                name=file.name,
                device=file.request.device,
                times=self.read_times,
                on_bytes=on_bytes,
            )
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
        with LocalSource(self.path, file.name) as source:
            raws = source.headers(e for _, e in chosen)
        for span, tensor, raw in zip(spans, tensors, raws):
            hashes = stored_hashes(raw, file.header, file.name, span.name)
            data = byte_view(tensor.reshape(-1).view(torch.uint8)) if span.length else b""
            hashes.check(data, tensor=span.name, uri=file.name)
