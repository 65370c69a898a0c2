"""The copy loop of a local file's reads onto a GPU (`read.local.read_spans` with
``staged``): each reader thread reads into its own ring of reused staging buffers and
copies each filled buffer onto the device while it reads the next. On CUDA the buffers are
page-locked (`_pin`) and the copies asynchronous, on the reader's own CUDA streams: no page
is faulted in after the first buffer, and host memory stays at readers x `STAGING_BUFFERS`
x `STAGING_BYTES`. An encrypted piece is decrypted in its buffer right after its read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .base import ReadTimes
from .memory import byte_view, populate
from .source import LocalSource

if TYPE_CHECKING:
    from .local import Piece

__all__ = ["Staged", "STAGING_BYTES", "STAGING_BUFFERS", "STAGING_STREAMS"]

STAGING_BYTES = 8 << 20  # one pinned staging buffer
STAGING_BUFFERS = 2  # staging buffers per reader thread (2 or more: one fills, one copies)
STAGING_STREAMS = 1  # CUDA streams per reader thread (buffer k copies on stream k mod this)


class Staged:
    """Reads into a ring of `STAGING_BUFFERS` reused staging buffers per run and copies each
    filled buffer onto the device: on CUDA, page-locked buffers and asynchronous copies on
    `STAGING_STREAMS` CUDA streams of the run's own (buffer k on stream k mod streams), a
    buffer refilled only once its copies are done. On the CPU (where tests check the
    bookkeeping), plain buffers and copies."""

    def __init__(self, path: str, name: str, device: torch.device):
        self.path, self.name, self.device = path, name, device
        self.cuda = device.type == "cuda"

    def read(self, run: list[Piece], on_bytes: Callable[[int], None] | None = None) -> ReadTimes:
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
            with LocalSource(self.path, self.name) as source:
                for span, memory, start, end in run:
                    length = end - start
                    view = ring.room(length)
                    began = clock()
                    source.read_into(span.offset + start, view, span.name)
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
