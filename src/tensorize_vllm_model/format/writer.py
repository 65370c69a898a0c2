"""Writing many tensors with tensorizer with the hashing of one tensor overlapping the next.

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

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["BATCH_BYTES", "batches", "write_batches"]

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
