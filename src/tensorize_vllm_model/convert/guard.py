"""The guard of a converted load: every parameter gets what vLLM's default loader would have
put there, or the load is refused naming the parameter.

vLLM's ``load_weights`` does not always copy a checkpoint tensor as it is stored: GPT-2's
``Conv1D`` weights are transposed (``loaded_weight.t()``) before the weight loader narrows
them, other loaders narrow along a dimension other than the first, reshape, or broadcast.
`regions.CopyWatch` records, for each copy the loaders make in the meta pass, the exact view
of the checkpoint tensor read (`regions.View`: offset, sizes, strides) and the tensor
written. Two checks stand on that record:

1. `direct_copy_ok`, before the read: a tensor's bytes may go straight into a parameter
   (`loading.ConvertedFile._direct`, no ``load_weights`` on it) only when that puts in every
   element of the parameter the element the recorded view gives it, i.e. the view walks the
   stored bytes in their stored order (row-major, or a column tile's rows) with the
   parameter's shape. Any other view (transposed, permuted, strided, broadcast) is left to
   vLLM's own weight loader, on the checkpoint tensor.
2. `check_loaded`, after the read: for every recorded copy, sampled elements of the written
   parameter are compared with the file's elements the view names (read again from the file,
   cast to the parameter's dtype as ``copy_`` would). A difference raises
   `ModelMismatchError` naming the parameter, the tensor and the element. This runs where
   single elements can be re-read cheaply: plain (not encrypted) local files; elsewhere only
   check 1 applies.

Tensors whose loaders did more than view and copy (`regions.Need.whole`) are loaded by vLLM's
own code on the whole tensor and are not sampled; so are copies into a loader's scratch tensor
(not a parameter or buffer of the model), which never go straight in either. "More than view
and copy" includes every later write onto a copy's elements, which `regions.CopyWatch` sees
in the meta pass: a loader that rewrites the parameter in place after its copy (Mamba2's
``A = -exp(A_log)``, vLLM's ``composed_weight_loader``), an in-place or ``out=`` op on it, a
second copy onto the same elements. So a recorded copy that is sampled is the parameter's
last write in vLLM's default loader, and the file's element is what that loader leaves
there; before, the first copy alone was recorded, the bytes went straight in, the rewrite
never ran, and the check compared the parameter with that first copy and agreed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import ModelMismatchError
from .regions import Need, View

__all__ = [
    "direct_copy_ok",
    "check_loaded",
    "stored_index",
    "samples_of",
    "Samples",
    "FileElements",
    "SAMPLES",
]

SAMPLES = 5  # elements compared per recorded copy: first, last, middle and two more
# Copies of one view into one storage (a layer's experts into its stacked weight) past the
# first FULL_COPIES compare one element each (the middle): every tensor is still checked,
# and the view's walk is proven on the first ones (18,867 copies x 5 samples were about
# 0.5 s of a Qwen3-MoE-shaped converted load).
FULL_COPIES = 4


def _contiguous_strides(sizes: Sequence[int]) -> list[int]:
    return [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]


@functools.lru_cache(maxsize=4096)
def _same_walk(view: View, shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether `view` has `shape` (size-1 dimensions aside) and, on every dimension longer
    than 1, the given `strides`."""
    sizes = [s for s in view.sizes if s != 1]
    if sizes != [s for s in shape if s != 1]:
        return False
    got = [st for s, st in zip(view.sizes, view.strides) if s != 1]
    want = [st for s, st in zip(shape, strides) if s != 1]
    return got == want


def direct_copy_ok(
    view: View, logical: Sequence[int], destination: torch.Tensor, start: int, tiles: int
) -> bool:
    """Whether reading the stored elements from `start` (logical element index of the
    checkpoint tensor of shape `logical`) into `destination` puts in it what vLLM's
    ``destination.copy_(view)`` would.

    Untiled: the bytes land in `destination`'s row-major order, so the view must walk them
    in that order with `destination`'s shape. Tiled (``[out, in]`` stored as ``[T, out,
    in / T]``): row ``r`` of the read tiles' columns lands in row ``r`` of `destination`, so
    the view must be ``[out, c1 - c0]`` with strides ``(in, 1)`` starting at column ``c0``.
    """
    shape = tuple(destination.shape)
    if math.prod(view.sizes) != destination.numel() or view.offset != start:
        return False
    if tiles:
        return len(logical) == 2 and _same_walk(view, shape, (logical[1], 1))
    return _same_walk(view, shape, tuple(_contiguous_strides(shape)))


def stored_index(logical_index: int, logical: Sequence[int], tiles: int) -> int:
    """The stored element index of logical element `logical_index` of a tensor of checkpoint
    shape `logical` (``[out, in]`` in `tiles` column tiles when `tiles` > 0)."""
    if not tiles:
        return logical_index
    out, inputs = logical
    width = inputs // tiles
    row, column = divmod(logical_index, inputs)
    return (column // width) * out * width + row * width + column % width


def _sample_positions(count: int) -> list[int]:
    if count <= 0:
        return []
    return sorted({0, count - 1, count // 2, count // 3, (7 * count) // 11})


def _view_element(view: View, shape: Sequence[int], flat: int) -> int:
    """The logical element of the checkpoint tensor that ``copy_`` of `view` (broadcast to
    `shape`, the destination's) puts at row-major position `flat` of the destination."""
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size) if size else (flat, 0)
        index.append(rest)
    index.reverse()
    element = view.offset
    pad = len(shape) - len(view.sizes)
    for dim, (size, stride) in enumerate(zip(view.sizes, view.strides)):
        if size != 1:
            element += index[pad + dim] * stride
    return element


def check_loaded(
    needs: Iterable[Need],
    model: nn.Module,
    read_element: Callable[[str, int], torch.Tensor] | FileElements | None,
    tiles: Mapping[str, int],
) -> int:
    """Compare sampled elements of every parameter a recorded copy wrote with the file's.

    The samples are gathered per written storage and compared in one step each (a
    Qwen3-MoE-shaped file's 18,867 copies: one torch op per sample cost 5.9 s here).

    Args:
        needs: the meta pass's record (`regions.CopyWatch.needs`).
        model: the loaded model (its parameters name the written tensors).
        read_element: the file's elements (`FileElements`), or ``(tensor name, stored
            element index) -> 0-d tensor`` of the file's dtype; None: nothing can be
            re-read cheaply here, nothing is sampled.
        tiles: the file's column-tiled tensors (`FileRecord.column_tiles`).

    Returns:
        How many elements were compared.

    Raises:
        ModelMismatchError: an element differs, naming the parameter, tensor and element.
    """
    if read_element is None:
        return 0
    source = read_element if isinstance(read_element, FileElements) else _ByCall(read_element)
    names = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
    names.update({b.untyped_storage().data_ptr(): n for n, b in model.named_buffers()})
    samples: dict[tuple[int, Any], Samples] = {}
    seen: dict[tuple[int, View], int] = {}  # copies sampled by storage and view
    for need in needs:
        if need.whole:
            continue
        written = list(zip(need.copies, need.views))
        for i, ((_, destination), view) in enumerate(written):
            if destination.untyped_storage().data_ptr() not in names:
                continue  # a loader's scratch tensor: its later work is the loader's own
            later = [d for (_, d), _ in written[i + 1 :]]
            _sample_copy(need, view, destination, later, source, tiles, (samples, seen))
    for (_, kind), group in samples.items():
        group.check(names, source.gather(kind, group.places))
    return sum(len(group.offsets) for group in samples.values())


class Samples:
    """Sampled elements written into one storage (`flat`: all of it, the destination's
    dtype) from tensors of one stored dtype: where they are and what the file holds."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat
        self.offsets: list[int] = []
        self.places: list[int] = []  # where each is in the file (`FileElements.locate`)
        self.about: list[tuple[str, list[int], int]] = []  # tensor, index written, element

    def check(self, names: dict[int, str], stored: torch.Tensor) -> None:
        """Compare with `stored`, the file's elements (its dtype) in `places`' order."""
        got = self.flat[torch.tensor(self.offsets)].cpu()
        expected = stored.to(got.dtype)  # as ``copy_`` casts
        if got.is_floating_point():
            got, expected = got.double(), expected.double()
            same = (got == expected) | (torch.isnan(got) & torch.isnan(expected))
        else:
            same = got == expected
        if bool(same.all()):
            return
        bad = int((~same).nonzero()[0])
        tensor, index, element = self.about[bad]
        parameter = names.get(self.flat.untyped_storage().data_ptr(), "?")
        raise ModelMismatchError(
            f"parameter {parameter} does not hold what vLLM's default loader puts there: "
            f"element {index} of the copy from tensor {tensor} is {got[bad].item()!r}, "
            f"the file's element {element} is {expected[bad].item()!r}; "
            "this converted load is refused (report it with the model's architecture)"
        )


def _sample_copy(
    need: Need,
    view: View,
    destination: torch.Tensor,
    later: list[torch.Tensor],
    source: FileElements | _ByCall,
    tiles: Mapping[str, int],
    into: tuple[dict[tuple[int, Any], Samples], dict[tuple[int, View], int]],
) -> None:
    """Add the sampled elements of one recorded copy into `destination` to `into`'s
    samples (all `SAMPLES`, or the middle one past `FULL_COPIES` copies of its view)."""
    samples, seen = into
    shape, strides = tuple(int(s) for s in destination.shape), tuple(destination.stride())
    base, ptr = int(destination.storage_offset()), destination.untyped_storage().data_ptr()
    spans = [_span(d) for d in later if d.untyped_storage().data_ptr() == ptr]
    group = None
    tiled = tiles.get(need.name, 0)
    chosen = samples_of(shape, strides, view, need.shape, tiled)
    copies = seen[ptr, view] = seen.get((ptr, view), 0) + 1
    if copies > FULL_COPIES:
        chosen = chosen[len(chosen) // 2 :][:1]
    for index, place, element in chosen:
        place += base
        if any(lo <= place <= hi for lo, hi in spans):  # overwritten by a later copy
            continue
        kind, where = source.locate(need.name, stored_index(element, need.shape, tiled))
        if group is None:
            key = (ptr, kind)
            if key not in samples:
                size = destination.untyped_storage().nbytes() // destination.element_size()
                samples[key] = Samples(destination.detach().as_strided((size,), (1,), 0))
            group = samples[key]
        group.offsets.append(place)
        group.places.append(where)
        group.about.append((need.name, index, element))


@functools.lru_cache(maxsize=4096)
def samples_of(
    shape: tuple[int, ...], strides: tuple[int, ...], view: View, logical: tuple, tiles: int
) -> tuple[tuple[list[int], int, int], ...]:
    """(index in the destination, its storage offset from the destination's, the
    checkpoint tensor's logical element) of each sample: the same for every copy of one
    shape and view (a layer's experts)."""
    found = []
    for flat in _sample_positions(math.prod(shape)):
        index = _unravel(flat, shape)
        place = sum(i * s for i, s in zip(index, strides))
        found.append((index, place, _view_element(view, shape, flat)))
    return tuple(found)


def _unravel(flat: int, shape: Sequence[int]) -> list[int]:
    """The index of row-major position `flat` in a tensor of `shape`."""
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size) if size else (flat, 0)
        index.append(rest)
    index.reverse()
    return index


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The first and last storage elements of `tensor`'s span (a bound: may hold elements
    a strided `tensor` skips, so a sample is dropped, never a difference invented)."""
    start = int(tensor.storage_offset())
    return start, start + sum(
        (int(s) - 1) * st for s, st in zip(tensor.shape, tensor.stride()) if s
    )


class FileElements:
    """Single elements of a local file, read many at once for `check_loaded`: `locate`
    says where one is, `gather` reads a list of them with one indexing op on the file's
    memory map (one ``pread`` per element cost 1-2 s for a Qwen3-MoE-shaped file's 94,335
    samples here).

    Args:
        path: the file.
        place_of: ``(tensor name, stored element index) -> (dtype, byte offset)``.
    """

    def __init__(self, path: str, place_of: Callable[[str, int], tuple[torch.dtype, int]]):
        import mmap

        import numpy

        self.locate = place_of
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._bytes = numpy.frombuffer(self._map, dtype=numpy.uint8)

    def gather(self, dtype: torch.dtype, offsets: list[int]) -> torch.Tensor:
        """The elements of `dtype` at byte `offsets` of the file, as a 1-D tensor."""
        import numpy

        size = dtype.itemsize
        at = numpy.asarray(offsets, dtype=numpy.int64)[:, None] + numpy.arange(size)
        return torch.from_numpy(self._bytes[at]).view(dtype).reshape(-1)

    def close(self) -> None:
        del self._bytes  # the map's one export
        self._map.close()


class _ByCall:
    """`FileElements`' two calls over ``(tensor name, stored index) -> 0-d tensor``: each
    element is read when located."""

    def __init__(self, read: Callable[[str, int], torch.Tensor]):
        self.read = read
        self.values: list[torch.Tensor] = []

    def locate(self, name: str, index: int) -> tuple[torch.dtype, int]:
        value = self.read(name, index).reshape(())
        self.values.append(value)
        return value.dtype, len(self.values) - 1

    def gather(self, dtype: torch.dtype, places: list[int]) -> torch.Tensor:
        return torch.stack([self.values[p] for p in places])
