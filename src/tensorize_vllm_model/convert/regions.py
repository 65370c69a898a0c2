"""Which bytes of each stored tensor a rank needs, found by watching vLLM's own weight
loaders work on meta tensors.

A model's ``load_weights`` narrows each checkpoint tensor to this rank's share (tensor
parallelism, merged q/k/v and gate/up, replicated KV heads, padded vocabularies) and copies
that view into the rank's parameter; tensors of other pipeline stages are skipped. Fed
meta tensors of the checkpoint's shapes (no memory, no data), the same code runs unchanged
under `CopyWatch`, which records the view each copy reads from instead of copying. A view
of a contiguous tensor is a box (a start and extent per dimension); its stored bytes are
one range of the file's tensor. When a loader does more than view and copy (a cast, an
arithmetic op), that tensor is marked as needed whole, so the result is always right and
only the bytes read can grow. So is a tensor whose copy is written again afterwards: a
loader that rewrites the parameter in place after copying (Mamba2's ``A``: vLLM's
``composed_weight_loader`` copies ``A_log``, then ``param.data.copy_(-exp(param))``), or a
copy that lands on bytes an earlier copy wrote; the watch keeps the byte spans every
recorded copy wrote, per storage, to see it.

Plain torch; the loader in `integrations.vllm.loader` drives it.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["View", "Need", "CopyWatch", "view_box", "box_byte_range"]


@dataclass(frozen=True)
class View:
    """A strided view of a contiguous tensor, in elements: ``as_strided(sizes, strides,
    offset)`` of its flat data, as a weight loader's ``narrow``/``t()``/``view`` made it."""

    offset: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]


@dataclass
class Need:
    """What a rank needs of one tensor: nothing (no copy seen), boxes of its logical
    shape, or all of it (`whole`)."""

    name: str
    shape: tuple[int, ...]
    boxes: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    whole: bool = False
    # each recorded copy: the box read and the real tensor (a parameter's view) written
    copies: list[tuple[tuple[tuple[int, int], ...], torch.Tensor]] = field(default_factory=list)
    # the view of the checkpoint tensor each copy read (in `copies`' order): which element
    # of the tensor lands in each element of the written tensor (`convert.guard`)
    views: list[View] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return self.whole or bool(self.boxes)


def view_box(
    shape: Sequence[int], offset: int, sizes: Sequence[int], strides: Sequence[int]
) -> tuple[tuple[int, int], ...] | None:
    """The box [start, stop) per dimension of a contiguous tensor of `shape` that a view
    (`offset`, `sizes`, `strides`, in elements) covers; None when the view is not a box
    of it (merged dimensions, overlapping strides)."""
    base = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    starts, rest = [], offset
    for size, stride in zip(shape, base):
        starts.append(rest // stride % size if size else 0)
    if sum(s * b for s, b in zip(starts, base)) != offset:
        return None
    extents = [1] * len(shape)
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        dims = [
            j
            for j, b in enumerate(base)
            if shape[j] > 1 and stride % b == 0 and stride // b < shape[j]
        ]
        if not dims or extents[dims[0]] != 1:
            return None
        j = dims[0]
        extents[j] = (size - 1) * (stride // base[j]) + 1
    box = tuple((s, s + e) for s, e in zip(starts, extents))
    if any(stop > size for (_, stop), size in zip(box, shape)):
        return None
    return box


def box_byte_range(
    boxes: Sequence[tuple[tuple[int, int], ...]],
    shape: Sequence[int],
    itemsize: int,
    tiles: int = 0,
) -> tuple[int, int]:
    """The one byte range [start, stop) of a tensor of logical `shape` that holds every
    box of `boxes`: stored row-major, or (`tiles` > 0) a 2-D ``[out, in]`` stored in
    `tiles` column tiles (``[T, out, in / T]``, `convert.placement`), whose range is the
    whole tiles holding the boxes' columns."""
    # the same boxes recur for every expert of a layer: 37,734 calls for a Qwen3-MoE-shaped
    # file's read plan, 0.6 s of a converted load before they were remembered
    return _box_byte_range(tuple(boxes), tuple(shape), itemsize, tiles)


@functools.lru_cache(maxsize=4096)
def _box_byte_range(
    boxes: tuple[tuple[tuple[int, int], ...], ...],
    shape: tuple[int, ...],
    itemsize: int,
    tiles: int,
) -> tuple[int, int]:
    if tiles:
        out, inputs = shape
        width, tile = inputs // tiles, out * (inputs // tiles) * itemsize
        first = min(box[1][0] for box in boxes) // width
        last = -(-max(box[1][1] for box in boxes) // width)
        return first * tile, last * tile
    base = _strides(shape)
    low, high = -1, -1
    for box in boxes:  # a plain loop: called for every tensor of a file (18k for an MoE)
        lo = hi = 0
        for (start, stop), stride in zip(box, base):
            lo += start * stride
            hi += (stop - 1) * stride
        low = lo if low < 0 or lo < low else low
        high = max(high, hi)
    if low < 0:
        raise ValueError("box_byte_range of no boxes")
    return low * itemsize, (high + 1) * itemsize


@functools.lru_cache(maxsize=1024)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major element strides of `shape`."""
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


class CopyWatch(TorchDispatchMode):
    """While active, copies from meta tensors made by `meta_input` into real tensors are
    recorded (as boxes of that input) and skipped; any other op mixing a meta input with
    real tensors marks the input as needed whole and runs on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.needs: dict[str, Need] = {}
        self._by_storage: dict[int, tuple[Need, torch.Tensor]] = {}
        self.current: Need | None = None
        # what recorded copies wrote, per real storage: `_entry`s, sorted by their span
        self._written: dict[int, list[list]] = {}
        # real storages written by anything but a recorded copy (`convert.layers`)
        self.touched: set[int] = set()
        self.inputs = 0  # meta inputs made: the tensors vLLM's loaders saw

    def meta_input(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A meta tensor standing for checkpoint tensor `name`."""
        tensor = torch.empty(tuple(shape), dtype=dtype, device="meta")
        self.inputs += 1
        need = self.needs.setdefault(name, Need(name, tuple(shape)))
        self._by_storage[tensor.untyped_storage()._cdata] = (need, tensor)
        self.current = need
        return tensor

    def _owner(self, tensor: torch.Tensor) -> Need | None:
        found = self._by_storage.get(tensor.untyped_storage()._cdata)
        return found[0] if found else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        metas = [t for t in tensors if t.is_meta]
        if func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            # a loader that changes the checkpoint tensor in place before copying it
            # (gpt-oss zeroes ``w2_bias`` on TP ranks but 0): its copies are not the file's
            # bytes, so vLLM's code gets the real tensor
            owner = self._owner(args[0]) if args[0].is_meta else None
            if owner is not None:
                owner.whole = True
            if not (func is torch.ops.aten.copy_.default and args[1].is_meta):
                # a real tensor written after a recorded copy into it (Mamba2's ``A``):
                # the parameter does not end up holding the file's bytes
                for written in _written_tensors(func, args, kwargs):
                    if not written.is_meta:
                        self.touched.add(written.untyped_storage().data_ptr())
                    self._overlapping(written)
        if not metas or len(metas) == len(tensors):
            return func(*args, **kwargs)
        if func is torch.ops.aten.copy_.default and args[1].is_meta and not args[0].is_meta:
            src = args[1]
            need = self._owner(src)
            box = (
                view_box(need.shape, src.storage_offset(), src.shape, src.stride())
                if need is not None
                else None
            )
            if need is None or box is None:
                self._whole(need)
                self.touched.add(args[0].untyped_storage().data_ptr())
                self._overlapping(args[0])  # not the file's bytes, onto a recorded copy
            else:
                need.boxes.append(box)
                need.copies.append((box, args[0]))
                need.views.append(View(src.storage_offset(), tuple(src.shape), src.stride()))
                self._record_write(args[0], need)
            return args[0]
        for t in metas:
            self._whole(self._owner(t))
        if func._schema.is_mutable:  # in place into a real tensor: skipped
            return args[0]
        meta = tree_map(
            lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs)
        )
        return func(*meta[0], **meta[1])

    def _record_write(self, destination: torch.Tensor, need: Need) -> None:
        """Keep the elements a recorded copy wrote; a copy onto elements an earlier one
        wrote (of this tensor or another) leaves both to vLLM's loader, in its order."""
        entry = _entry(destination, need)
        if entry is None:
            return
        if self._overlapping(destination, entry):
            need.whole = True
        spans = self._written.setdefault(destination.untyped_storage().data_ptr(), [])
        bisect.insort(spans, entry, key=lambda e: (e[0], e[1]))

    def _overlapping(self, tensor: torch.Tensor, entry: list | None = None) -> bool:
        """Whether real `tensor` (recorded as `entry`, or a tensor being written) meets the
        elements of a recorded copy; the copies it meets are marked needed whole."""
        if tensor.is_meta:
            return False
        spans = self._written.get(tensor.untyped_storage().data_ptr())
        mine = entry or (_entry(tensor, None) if spans else None)
        if spans is None or mine is None:
            return False
        start, stop, found = mine[0], mine[1], False
        # look from the last span starting before `stop` back while one may reach `start`:
        # past a span that meets no other span (`clean`) and ends before it, none can
        for other in reversed(spans[: bisect.bisect_left(spans, stop, key=lambda e: e[0])]):
            if other[1] > start:
                if entry is not None:  # bounds that meet: earlier spans may reach past
                    entry[4] = other[4] = False
                if _meet(mine[3], other[3]):
                    found = other[2].whole = True
            elif other[4]:
                break
        return found

    def _whole(self, need: Need | None) -> None:
        # A tensor the watch cannot trace back: the one being loaded now is read whole.
        need = need or self.current
        if need is not None:
            need.whole = True

    def results(self) -> Iterator[Need]:
        return iter(self.needs.values())


def _entry(tensor: torch.Tensor, need: Need | None) -> list | None:
    """[start, stop, need, layout, clean] of real `tensor`: the bytes of its storage it
    spans (a bound for a strided one), its layout for `_meet` (element size, offset, sizes,
    strides) and whether its span meets no other (`CopyWatch._overlapping` keeps it); None
    when it has no elements."""
    if not tensor.numel():
        return None
    size = tensor.element_size()
    sizes = tuple(int(n) for n in tensor.shape)
    strides = tuple(int(st) for st in tensor.stride())
    last = sum((n - 1) * st for n, st in zip(sizes, strides))
    start = int(tensor.storage_offset()) * size
    layout = (size, int(tensor.storage_offset()), sizes, strides)
    return [start, start + (last + 1) * size, need, layout, True]


def _meet(a: tuple, b: tuple) -> bool:
    """Whether two views of one storage (`_entry`'s layouts) may share an element: True
    unless shown apart. Shown for views with the same element size and strides that nest
    (each a multiple of the next, the last 1): both are boxes of one row-major array
    (fused experts' gate and up halves, ``w13[:, :I]`` and ``w13[:, I:]``), apart when
    their boxes are, on some dimension."""
    (size, offset_a, sizes_a, strides), (size_b, offset_b, sizes_b, strides_b) = a, b
    if size != size_b or strides != strides_b or len(sizes_a) != len(sizes_b):
        return True
    kept = [d for d in range(len(strides)) if sizes_a[d] > 1 or sizes_b[d] > 1]
    steps = [strides[d] for d in kept]
    if (
        not steps
        or steps[-1] != 1
        or any(s <= 0 or s % t or s == t for s, t in zip(steps, steps[1:]))
    ):
        return True
    radix = [0] + [s // t for s, t in zip(steps, steps[1:])]
    boxes = []
    for offset, sizes in ((offset_a, sizes_a), (offset_b, sizes_b)):
        box = []
        for j, d in enumerate(kept):
            at = offset // steps[j] if j == 0 else offset // steps[j] % radix[j]
            if j and at + sizes[d] > radix[j]:
                return True  # wraps into the next row: no box
            box.append((at, at + sizes[d]))
        if sum(lo * st for (lo, _), st in zip(box, steps)) != offset:
            return True
        boxes.append(box)
    return all(lo1 < hi2 and lo2 < hi1 for (lo1, hi1), (lo2, hi2) in zip(*boxes))


@functools.lru_cache(maxsize=512)
def _write_positions(func) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments op `func` writes, by its schema."""
    return tuple(
        (i, a.name)
        for i, a in enumerate(func._schema.arguments)
        if a.alias_info is not None and a.alias_info.is_write
    )


def _written_tensors(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors op `func` writes, among `args` and `kwargs`."""
    found: list[torch.Tensor] = []
    for i, name in _write_positions(func):
        value = args[i] if i < len(args) else kwargs.get(name)
        values = value if isinstance(value, (list, tuple)) else (value,)
        found.extend(v for v in values if isinstance(v, torch.Tensor))
    return found


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an op's arguments, and in its list or tuple arguments (aten ops
    nest no deeper): what ``tree_flatten`` finds, without its cost on every op."""
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found
