"""Many small plain reads of one local file in few system calls: ranges that lie close
together in the file are read by one ``preadv`` that scatters each range into its tensor
and the bytes between them (tensorizer's per-tensor headers) into a scratch buffer.

A mixture-of-experts file holds one small tensor per expert projection (18,432 of about
50 KB in a Qwen3-30B-A3B-shaped 0.92 GB file), each read straight into its slot of a
layer's stacked expert weights: one ``preadv`` (and GIL hand-off) per tensor cost about
2 s of a converted load on a loaded 2-core machine; with up to `IOV_MAX` buffers per call,
a few dozen calls read them all.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .memory import IOV_MAX, has_preadv, preadv_iovecs  # IOV_MAX: buffers per preadv call

__all__ = ["read_scattered", "read_tiles_scattered", "read_at", "GAP_BYTES"]

GAP_BYTES = 64 << 10  # bytes between two ranges read (and dropped) rather than skipped


def read_scattered(
    fd: int,
    reads: Sequence[tuple[int, int, torch.Tensor, int]],
    fallback: Callable[[int], None],
) -> None:
    """Read each ``(file offset, length, uint8 CPU tensor, byte offset in it)`` of
    `reads` by `read_at` (few ``preadv`` calls, the reads sorted by offset). Where a call
    reads short (a file that ends early), each read not yet complete is handed to
    ``fallback(index)``, which reads it alone (and names the file if it is truncated); so is
    every read where the C library's ``preadv`` cannot be called (`memory.has_preadv`).

    Raises:
        ValueError: a read does not fit in its tensor, or the tensor is not contiguous
            (nothing is read).
    """
    import numpy as np

    if not reads:
        return
    if not has_preadv():
        for i in range(len(reads)):
            fallback(i)
        return
    for _, length, tensor, place in reads:  # raw addresses below: bounds checked here
        room = tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous() or place < 0 or length < 0 or place + length > room:
            raise ValueError(f"a read of {length} bytes at {place} does not fit its tensor")
    order = np.argsort(np.fromiter((r[0] for r in reads), np.int64, len(reads)), kind="stable")
    offsets = np.fromiter((reads[i][0] for i in order), np.int64, len(reads))
    lengths = np.fromiter((reads[i][1] for i in order), np.int64, len(reads))
    addresses = np.fromiter(
        (reads[i][2].data_ptr() + reads[i][3] for i in order), np.int64, len(reads)
    )
    try:
        read_at(fd, offsets, addresses, lengths)
    except EOFError as e:  # reads ending at or before where the file ended are complete
        reached = e.args[0]
        for k in np.flatnonzero(offsets + lengths > reached).tolist():
            fallback(int(order[k]))


def read_tiles_scattered(
    fd: int,
    reads: Sequence[tuple[int, int, torch.Tensor, Any]],
    fallback: Callable[[int], None],
) -> None:
    """Read each ``(file offset, length, tensor, part)`` of `reads`: `length` bytes of
    whole column tiles of `part` (`parts.Part`: ``part.shape[0]`` rows of
    ``part.tile_row`` elements each, of the tensor's dtype), stored one after another, into
    the columns of `tensor` (``[rows, tiles * tile_row]``, last dimension contiguous): row
    ``r`` of tile ``j`` into ``tensor[r, j * tile_row : (j + 1) * tile_row]``.

    All of them are first read into one buffer by `read_scattered` (few ``preadv`` calls),
    then each is put in place by one ``copy_``: a ``preadv`` of each tile's rows straight
    into the columns cost one call and its Python set-up per tile, 49,152 of them (about
    1.5 s of reading threads' time) for the 6,144 down projections of a Qwen3-MoE-shaped
    file at TP=1 (benchmarks/moe.py). A group read short is left to ``fallback(index)``."""
    from .memory import populate

    places = list(itertools.accumulate((length for _, length, _, _ in reads), initial=0))
    buffer = torch.empty(places[-1], dtype=torch.uint8)
    short: set[int] = set()
    read_scattered(
        fd,
        [(offset, length, buffer, at) for (offset, length, _, _), at in zip(reads, places)],
        short.add,
    )
    for i, ((_, length, tensor, part), at) in enumerate(zip(reads, places)):
        if i in short:
            fallback(i)
            continue
        if tensor.numel():  # its pages made present in one call, from first to last element
            end = tensor[-1, -1:]
            populate(tensor.data_ptr(), end.data_ptr() + tensor.element_size() - tensor.data_ptr())
        stored = buffer[at : at + length].view(tensor.dtype).view(-1, part.shape[0], part.tile_row)
        tensor.unflatten(1, (-1, part.tile_row)).transpose(0, 1).copy_(stored)


def read_at(fd: int, offsets: Any, addresses: Any, lengths: Any) -> int:
    """Read ``lengths[i]`` bytes of the file at ``offsets[i]`` into memory at
    ``addresses[i]``, for every i (numpy int64 arrays; `offsets` ascending, the ranges apart),
    in few ``preadv`` calls made through the C library (no Python object per read): reads at
    most `GAP_BYTES` apart share a call, the bytes between them read into a scratch buffer.
    The memory must be writable and stay alive for the call. Returns the calls made.

    Raises:
        OSError: a read failed (or the C library's ``preadv`` cannot be called here:
            `read.memory.has_preadv`).
        EOFError: the file ends before a read does.
    """
    import numpy as np

    count = len(offsets)
    if not count:
        return 0
    ends = offsets + lengths
    gaps = np.zeros(count, dtype=np.int64)
    gaps[1:] = offsets[1:] - ends[:-1]
    cuts = np.flatnonzero((gaps < 0) | (gaps > GAP_BYTES)).tolist()
    scratch = np.empty(GAP_BYTES, dtype=np.uint8)
    calls = 0
    for lo, hi in zip([0, *cuts], [*cuts, count]):
        for first in range(lo, hi, IOV_MAX // 2):
            last = min(hi, first + IOV_MAX // 2)
            iovecs = np.empty((2 * (last - first) - 1, 2), dtype=np.uint64)
            iovecs[0::2, 0] = addresses[first:last]
            iovecs[0::2, 1] = lengths[first:last]
            iovecs[1::2, 0] = scratch.ctypes.data
            iovecs[1::2, 1] = gaps[first + 1 : last]
            want = int(ends[last - 1] - offsets[first])
            got = preadv_iovecs(fd, iovecs, int(offsets[first]))
            calls += 1
            if got != want:  # a regular file returns less only at its end
                raise EOFError(int(offsets[first]) + got)
    return calls
