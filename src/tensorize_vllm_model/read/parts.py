"""What a partial read (`read.partial.read_parts`) is asked for, and what it did: `Part`,
the stored bytes of one tensor a rank needs (and, for a converted load, the parameters they
go into); `PartsRead`, the bytes and requests it took.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Part", "PartsRead"]


@dataclass(frozen=True)
class Part:
    """Bytes [start, stop) of one tensor's stored data; `entry` is tensorizer's index entry
    (its ``data_offset`` and ``data_length``), `cipher` its chunk cipher when encrypted."""

    name: str
    entry: Any
    start: int
    stop: int
    cipher: Any = None
    # (start, stop, tensor): the stored bytes [start, stop) go into these CPU tensors
    # (parameters' memory) instead of a buffer: read straight there when plain, of the
    # stored dtype and not in column tiles; else piece by piece through a small buffer
    # (decrypted, then copied with ``copy_``, which casts, and tiles into columns: the
    # bytes of whole tiles into a tensor of the logical rows and the tiles' columns)
    targets: tuple[tuple[int, int, torch.Tensor], ...] = ()
    dtype: torch.dtype = torch.uint8  # the stored dtype
    tiles: int = 0  # column tiles of a tiled tensor (`convert.placement`; 0: not tiled)
    shape: tuple[int, ...] = ()  # the logical shape ([out, in]) of a tiled tensor

    def only_tiled(self, tensor: torch.Tensor) -> bool:
        """Whether a target's bytes need only be put into its columns: tiled, plain, of
        the parameter's dtype (a local file reads them straight there: `read.partial`)."""
        return bool(self.tiles) and self.cipher is None and tensor.dtype == self.dtype

    @property
    def tile_bytes(self) -> int:
        """Bytes of one column tile (``out * in / T`` elements)."""
        out, inputs = self.shape
        return out * (inputs // self.tiles) * self.dtype.itemsize

    @property
    def tile_row(self) -> int:
        """Elements of one row of a column tile (``in / T``)."""
        return self.shape[1] // self.tiles

    @property
    def span(self) -> tuple[int, int]:
        """The range actually read: whole cipher chunks when encrypted."""
        return self.span_of(self.start, self.stop)

    def span_of(self, start: int, stop: int) -> tuple[int, int]:
        """The bytes read for stored bytes [start, stop): whole cipher chunks when
        encrypted."""
        if self.cipher is None:
            return start, stop
        size = self.cipher.chunk_size
        return start // size * size, min(self.entry.data_length, -(-stop // size) * size)

    def through_buffer(self, tensor: torch.Tensor) -> bool:
        """Whether a target's bytes pass through a buffer (not read straight into it)."""
        return self.cipher is not None or bool(self.tiles) or tensor.dtype != self.dtype


@dataclass
class PartsRead:
    """What `read_parts` read: bytes and requests."""

    bytes: int = 0
    requests: int = 0
