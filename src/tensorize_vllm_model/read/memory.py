"""The memory our readers read into: CPU tensors' bytes as writable views, their pages made
present in one call, and rows of a 2-D tensor filled by one ``preadv``.

A fresh tensor's pages are not yet in memory; a ``read()`` into it takes each page's
first-touch fault inside the kernel's copy, which is slow on virtual machines. Asking the
kernel to make a piece's pages present in one call (``MADV_POPULATE_WRITE``), then reading
into it, beat a bare ``readinto`` of the same file (warm) and tensorizer's reader (cold) in
alternating measurements (docs/performance.md and its archive). Every engine
(`read.local`, `read.remote`, `read.ranges`, `read.partial`) reads through these.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

import torch

__all__ = [
    "byte_view",
    "populate",
    "make_present",
    "fresh_bytes",
    "read_rows",
    "preadv_iovecs",
    "has_preadv",
    "IOV_MAX",
]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
IOV_MAX = 1024  # iovecs per preadv call (Linux UIO_MAXIOV)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 CPU tensor, writable, without a copy."""
    return memoryview(tensor.numpy())  # type: ignore[arg-type]  # numpy arrays are buffers


def fresh_bytes(size: int) -> torch.Tensor:
    """A new uint8 CPU tensor of `size` bytes, its pages made present (`populate`)."""
    memory = torch.empty(size, dtype=torch.uint8)
    populate(memory.data_ptr(), size)
    return memory


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


def make_present(tensor: torch.Tensor) -> None:
    """Make the pages under `tensor` present in one call (`populate`), from its first
    element to its last (a strided tensor's gaps included): faulted in one by one by
    copies into it, a fresh parameter's pages cost more than the copies themselves."""
    if tensor.numel() == 0:
        return
    first, last = tensor[(0,) * tensor.dim()], tensor[(-1,) * tensor.dim()]
    populate(first.data_ptr(), last.data_ptr() + tensor.element_size() - first.data_ptr())


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


def read_rows(fd: int, rows: torch.Tensor, offset: int) -> bool:
    """Read the file's bytes from `offset` on into the rows of `rows`, a 2-D CPU tensor
    whose rows are contiguous but need not follow one another (columns of a wider
    tensor): one ``preadv`` of up to `IOV_MAX` rows at a time, straight into the rows,
    with no buffer. False where the C library's ``preadv`` cannot be called (the caller
    reads through a buffer instead).

    Raises:
        OSError: the read failed.
        EOFError: the file ends before the last row.
    """
    import numpy as np

    if _preadv is None or rows.numel() == 0:
        return _preadv is not None
    count, width = rows.shape[0], rows.shape[1] * rows.element_size()
    iovecs = np.empty((count, 2), dtype=np.uint64)
    iovecs[:, 0] = rows.data_ptr() + np.arange(count, dtype=np.uint64) * (
        rows.stride(0) * rows.element_size()
    )
    iovecs[:, 1] = width
    for first in range(0, count, IOV_MAX):
        n = min(IOV_MAX, count - first)
        got = preadv_iovecs(fd, iovecs[first : first + n], offset + first * width)
        if got != n * width:  # a regular file returns less only at its end
            raise EOFError(offset + first * width + got)
    return True


def preadv_iovecs(fd: int, iovecs: Any, offset: int) -> int:
    """The C library's ``preadv`` of `iovecs` (a C-contiguous numpy uint64 array of
    ``(address, length)`` rows, at most `IOV_MAX`) from file `offset`: the bytes read.

    Raises:
        OSError: the read failed, or ``preadv`` cannot be called here (`has_preadv`).
    """
    if _preadv is None:
        raise OSError("the C library's preadv cannot be called on this system")
    got = _preadv(fd, iovecs.ctypes.data, len(iovecs), offset)
    if got < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(got)


def has_preadv() -> bool:
    """Whether `preadv_iovecs` can be called here (Linux's C library)."""
    return _preadv is not None


_preadv = _libc(
    "preadv", [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long], ctypes.c_ssize_t
)
