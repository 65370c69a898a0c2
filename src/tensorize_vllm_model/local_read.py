"""Reading a plain local tensors file into CPU memory: parallel reads into memory whose
pages are made present first.

A fresh tensor's pages are not yet in memory; a ``read()`` into it takes each page's
first-touch fault inside the kernel's copy, which is slow on virtual machines. Asking the
kernel to make a piece's pages present in one call (``MADV_POPULATE_WRITE``), then reading
into it, beat a bare ``readinto`` of the same file (warm) and tensorizer's reader (cold) in
alternating measurements (README, Performance). Only plain (unencrypted) local files, read
without hash checks, take this path; the index has been checked against the file's length
(`streaming._check_index`) before anything here runs.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import FormatError, StorageError

__all__ = ["Span", "read_spans"]

PIECE_BYTES = 16 << 20  # pages made present per call; 16 to 128 MiB measured alike
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


def read_spans(path: str, spans: Sequence[Span], threads: int,
               *, name: str | None = None) -> list[torch.Tensor]:
    """Read every span of the file at `path` into a new CPU tensor, with `threads` readers.

    Raises:
        StorageError: the file cannot be read.
        FormatError: it ends before a span does (it changed after its index was checked).
    """
    name = name or path
    tensors = []
    pieces = []
    for span in spans:
        size = _byte_size(span)
        if span.length == 0:
            tensors.append(torch.zeros(span.shape, dtype=span.dtype))
            continue
        if span.length != size:
            raise FormatError(f"{name} is corrupt: tensor {span.name} holds {span.length} "
                              f"bytes where its shape and dtype need {size}")
        memory = torch.empty(size, dtype=torch.uint8)
        tensors.append(memory.view(span.dtype).reshape(span.shape))
        for start in range(0, size, PIECE_BYTES):
            pieces.append((span, memory, start, min(size, start + PIECE_BYTES)))
    total = sum(end - start for _, _, start, end in pieces)
    runs: list[list[tuple[Span, torch.Tensor, int, int]]] = [[]]
    done = 0
    for piece in pieces:  # contiguous runs of the file, about equal in bytes
        if done >= total * len(runs) / max(1, threads) and runs[-1]:
            runs.append([])
        runs[-1].append(piece)
        done += piece[3] - piece[2]

    def read(run: list[tuple[Span, torch.Tensor, int, int]]) -> None:
        # One descriptor per run, read in order: the kernel's readahead sees a sequential
        # reader (pieces interleaved across threads on one descriptor read cold files slower).
        with open(path, "rb", buffering=0) as f:
            for span, memory, start, end in run:
                _populate(memory.data_ptr() + start, end - start)
                view = memoryview(memory.numpy())[start:end]
                got = 0
                while got < len(view):
                    count = os.preadv(f.fileno(), [view[got:]], span.offset + start + got)
                    if count == 0:
                        raise FormatError(f"{name} is truncated: tensor {span.name} ends "
                                          f"past the end of the file")
                    got += count

    try:
        with ThreadPoolExecutor(len(runs)) as pool:
            for _ in pool.map(read, runs):
                pass
    except OSError as e:
        raise StorageError(f"cannot read {name}: {e}") from None
    return tensors


def _byte_size(span: Span) -> int:
    return math.prod(span.shape) * span.dtype.itemsize


def _populate(address: int, length: int) -> None:
    """Make the whole pages of [address, address + length) present and writable, in one
    call; without the call (other systems, old kernels) each page faults in on first write."""
    global _madvise
    if _madvise is False:
        return
    start = -(-address // _PAGE) * _PAGE
    end = (address + length) // _PAGE * _PAGE
    if end > start and _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        _madvise = False  # not supported here: stop asking


def _find_madvise():
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_madvise = _find_madvise()
