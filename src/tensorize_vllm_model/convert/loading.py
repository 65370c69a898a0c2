"""Loading a converted (checkpoint-form) file at any layout: the pieces the vLLM loader
(`integrations.vllm.loader`) puts around vLLM's own ``model.load_weights``.

1. `ConvertedFile.meta_inputs` hands ``load_weights`` a meta tensor of each checkpoint
   tensor's shape under `regions.CopyWatch`, which records what this rank copies of each.
2. `ConvertedFile.parts` turns that into one byte range per needed tensor (tensors of other
   pipeline stages: none), widened to cipher chunks when encrypted.
3. `ConvertedFile.tensors` reads only those ranges (`read.partial`) and hands each tensor
   to ``load_weights`` in its checkpoint shape (a tiled one with its read tiles' columns
   put back), so vLLM's weight loaders narrow and copy it into the rank's parameters as
   from the checkpoint itself. Where every copy of a tensor was one byte range of it into
   a CPU parameter of that size (a contiguous parameter or rows of one; of a tiled tensor,
   the columns of whole tiles, all rows), the bytes go into the parameter instead (in
   place, or piece by piece when decrypted, cast or tiled: `read.partial`), and
   ``load_weights`` does not see that tensor again: everything else its loader did
   (padding filled, ...) was already done in step 1.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .. import storage
from ..core.errors import FormatError, StorageError
from ..read.partial import open_source, read_parts
from ..read.parts import Part, PartsRead
from .guard import FileElements, direct_copy_ok
from .placement import logical_shape
from .regions import CopyWatch, Need, box_byte_range
from .runs import RunReads, read_runs

if TYPE_CHECKING:
    from ..config import TensorizerConfig
    from ..read.reader import TensorReader

__all__ = ["ConvertedFile", "checkpoint_tensors", "collections_paused"]


class ConvertedFile:
    """An open converted file, seen as the checkpoint it came from."""

    def __init__(self, reader: TensorReader, uri: str, config: TensorizerConfig, threads: int):
        self.reader = reader
        self.uri = uri  # unredacted: the reads need its query string
        self.config = config
        self.threads = threads
        record = reader.record
        if record is not None and record.transposed:
            raise FormatError(
                f"{reader.uri} was converted by an earlier tensorize_vllm_model, which "
                "stored row-parallel weights transposed; convert the checkpoint again"
            )
        self.tiles = record.column_tiles if record is not None else {}
        self.entries = {e.name: e for e in reader.entries()}
        self.index = reader.index
        # verify_hash: tensorizer's hashes cover whole tensors, so each needed tensor is
        # read whole (not only this rank's rows or columns) and checked (`format.hashes`).
        self.verify = bool(getattr(config, "verify_hash", False))
        self._elements: FileElements | None = None  # `element_reader`'s
        # the storage addresses of the model's parameters and buffers: bytes go straight
        # only into those (`parts`, `direct_targets`)
        self.owners: set[int] | None = None

    def stored_dtype(self, name: str) -> torch.dtype:
        dtype = getattr(torch, self.entries[name].dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise FormatError(
                f"{self.reader.uri}: tensor {name} has dtype "
                f"{self.entries[name].dtype}, which torch does not have"
            )
        return dtype

    @property
    def plain_local(self) -> bool:
        """Whether the file is local and not encrypted (its bytes can go straight in, and
        single elements be re-read cheaply)."""
        return storage.local_path(self.uri) is not None and not self.reader.encrypted

    def logical_shape(self, name: str) -> tuple[int, ...]:
        return logical_shape(self.entries[name].shape, self.tiles.get(name, 0))

    def meta_inputs(
        self, watch: CopyWatch, names: Iterable[str] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, meta tensor of its checkpoint shape) of every tensor (or of `names`), in
        file order (in `names`' order)."""
        for name in self.entries if names is None else names:
            yield name, watch.meta_input(name, self.logical_shape(name), self.stored_dtype(name))

    def parts(self, needs: dict[str, Need], owners: set[int] | None = None) -> list[Part]:
        """One `Part` per tensor this rank needs, in file order. With `owners` (the storage
        addresses of the model's parameters and buffers), bytes go straight only into those:
        a copy into a loader's scratch tensor, which the loader then works on, is left to
        the loader (the meta pass already ran that work, on the scratch's old contents)."""
        self.owners = owners if owners is not None else self.owners
        chosen = [
            (name, needs[name]) for name in self.entries if name in needs and needs[name].needed
        ]
        ciphers = self._ciphers([name for name, _ in chosen])
        parts = []
        for (name, need), cipher in zip(chosen, ciphers):
            entry = self.index[name]
            dtype, tiles = self.stored_dtype(name), self.tiles.get(name, 0)
            if need.whole or self.verify:
                start, stop = 0, entry.data_length
            else:
                start, stop = box_byte_range(need.boxes, need.shape, dtype.itemsize, tiles)
            targets = () if need.whole or self.verify else self.direct_targets(name, need)
            shape = self.logical_shape(name)
            parts.append(Part(name, entry, start, stop, cipher, targets, dtype, tiles, shape))
        return parts

    def direct_targets(self, name: str, need: Need) -> tuple[tuple[int, int, torch.Tensor], ...]:
        """Where every copy of the tensor is one byte range of it -> a CPU tensor of the
        same size (a contiguous parameter or its rows; of a tiled tensor, the columns of
        whole tiles, all rows, into a parameter of that shape): those bytes go straight
        there (`read.partial`: read in place, or piece by piece through a small buffer when
        decrypted, cast by ``copy_`` as the weight loader's copy would, or tiled), with no
        buffer of the whole part. Empty when any copy is not like that."""
        dtype = self.stored_dtype(name)
        tiles = self.tiles.get(name, 0)
        owners = self.owners
        targets = []
        for (box, destination), view in zip(need.copies, need.views):
            if destination.device.type != "cpu":
                return ()
            if owners is not None and destination.untyped_storage().data_ptr() not in owners:
                return ()
            if tiles:
                if not self._whole_tiles(name, box, destination):
                    return ()
            elif not destination.is_contiguous():
                return ()
            lo, hi = box_byte_range([box], need.shape, dtype.itemsize, tiles)
            if hi - lo != destination.numel() * dtype.itemsize:
                return ()
            # the view the loader copied must walk those bytes in their stored order
            # (not GPT-2's transposed Conv1D weights, ...): `guard`
            start = box[1][0] if tiles else lo // dtype.itemsize
            if not direct_copy_ok(view, need.shape, destination, start, tiles):
                return ()
            targets.append((lo, hi, destination))
        return tuple(targets)

    def _whole_tiles(self, name: str, box: tuple, destination: torch.Tensor) -> bool:
        """Whether `box` of a tiled tensor is all its rows and the columns of whole tiles,
        copied into a 2-D `destination` of that shape."""
        out, inputs = self.logical_shape(name)
        width = inputs // self.tiles[name]
        if len(box) != 2 or box[0] != (0, out):
            return False
        (c0, c1) = box[1]
        return (
            c0 % width == 0
            and c1 % width == 0
            and tuple(destination.shape) == (out, c1 - c0)
            and destination.stride(-1) == 1  # rows of a tile land as runs of elements
        )

    def element_reader(self) -> FileElements | None:
        """The file's single elements (`guard.FileElements`, by tensor name and stored
        element index), for `guard.check_loaded`; None where they cannot be re-read
        cheaply (an encrypted or remote file). `close_element_reader` releases it."""
        path = storage.local_path(self.uri)
        if path is None or self.reader.encrypted or not os.path.getsize(path):
            return None

        tensors: dict[str, tuple[torch.dtype, int]] = {}  # name -> (dtype, data offset)

        def place(name: str, index: int) -> tuple[torch.dtype, int]:
            found = tensors.get(name)
            if found is None:
                found = tensors[name] = (self.stored_dtype(name), self.index[name].data_offset)
            return found[0], found[1] + index * found[0].itemsize

        self._elements = FileElements(path, place)
        return self._elements

    def close_element_reader(self) -> None:
        if self._elements is not None:
            self._elements.close()
            self._elements = None

    def _ciphers(self, names: list[str]) -> list[Any]:
        if not self.reader.encrypted:
            return [None] * len(names)
        from ..read.decrypt import cipher_from_header

        entries = [self.index[n] for n in names]
        with open_source(self.uri, self.config.options) as source:
            raws = source.headers(entries)
        try:
            found = [
                cipher_from_header(e, raw, self.reader.header_deserializer)
                for e, raw in zip(entries, raws)
            ]
        except Exception:  # noqa: BLE001 - tensorizer's header parser decides which
            found = None
        if found is None:
            raise FormatError(
                f"{self.reader.uri}: an encrypted tensor's header is not in "
                "the form tensorizer 2.12 writes"
            )
        return found

    def tensors(
        self, parts: list[Part], read: PartsRead, runs: RunReads | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor in its checkpoint shape) of every part, its needed bytes read;
        first, `runs` (`convert.runs`) are read straight into their parameters."""
        from ..core.progress import resize

        options = self.config.options
        on_bytes = self.reader.on_bytes  # the load's progress: this rank's share of the file
        ahead = runs.bytes if runs is not None else 0
        resize(on_bytes, ahead + sum(part.span[1] - part.span[0] for part in parts))
        if runs is not None and ahead:
            path = storage.local_path(self.uri)
            assert path is not None  # runs are planned for plain local files only
            try:
                read.requests += read_runs(path, runs, self.threads, uri=self.reader.uri)
            except OSError as e:
                raise StorageError(f"cannot read {self.reader.uri}: {e}") from None
            read.bytes += ahead
            if on_bytes is not None:
                on_bytes(ahead)
        for part, buffer in read_parts(
            self.uri, parts, threads=self.threads, options=options, stats=read
        ):
            if on_bytes is not None:
                on_bytes(part.span[1] - part.span[0])
            if buffer is None:  # read straight into the parameters: vLLM's copy is done
                continue
            if self.verify:
                self._check_hash(part, buffer, options)
            stored = buffer.view(self.stored_dtype(part.name)).reshape(
                self.entries[part.name].shape
            )
            yield part.name, (_untile(stored, part) if part.tiles else stored)

    def _check_hash(self, part: Part, buffer: torch.Tensor, options: Any) -> None:
        """Check a whole tensor's plaintext bytes, `buffer`, against its stored hashes.

        Raises:
            CorruptTensorError: a hash does not match (naming the file and tensor).
            FormatError: the tensor's header cannot be parsed.
        """
        from ..read.checks import stored_hashes
        from ..read.memory import byte_view

        entry = self.index[part.name]
        with open_source(self.uri, options) as source:
            [raw] = source.headers([entry])
        hashes = stored_hashes(raw, self.reader.header_deserializer, self.reader.uri, part.name)
        data = byte_view(buffer.reshape(-1).view(torch.uint8)) if entry.data_length else b""
        hashes.check(data, tensor=part.name, uri=self.reader.uri)


def _untile(tiles: torch.Tensor, part: Part) -> torch.Tensor:
    """The checkpoint tensor ``[out, in]`` of a tiled tensor ``[T, out, in / T]``, its
    columns filled from the tiles `part` read (whole tiles: [start, stop) of its bytes);
    the other columns, which this rank's weight loaders do not copy, are left unset."""
    out, inputs = part.shape
    width = inputs // part.tiles
    tensor = torch.empty(out, inputs, dtype=tiles.dtype)
    for tile in range(part.start // part.tile_bytes, -(-part.stop // part.tile_bytes)):
        tensor[:, tile * width : (tile + 1) * width].copy_(tiles[tile])
    return tensor


def checkpoint_tensors(reader: TensorReader) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a converted file, whole, in its checkpoint shape (column tiles put
    back), in file order: what a reload by checkpoint name needs (vLLM 0.34's
    ``BaseModelLoader.get_all_weights``). Each tensor is freshly allocated."""
    record = reader.record
    tiles = record.column_tiles if record is not None else {}
    for name, tensor in reader.items():
        if tiles.get(name):
            tensor = torch.cat(list(tensor), dim=1)  # [T, out, in / T] -> [out, in]
        yield name, tensor


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (as it was after it): a
    converted load makes a few objects per checkpoint tensor (its need, part, samples),
    and each full collection meanwhile walks every object of the process (vLLM's, torch's);
    where those fell moved 0.2-0.5 s between the load's phases (benchmarks/moe.py). What
    the load leaves for the collector is collected at its next run (the loader's
    ``gc.collect`` after the load)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
