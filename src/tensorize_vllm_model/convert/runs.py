"""A mixture-of-experts file's derived experts read and checked a run at a time.

`experts.ExpertRun` holds a layer's derived experts for one checkpoint piece as the layer's
first expert's copies and each expert's slot. Spelled out one `Need`, `read.parts.Part` and
guard sample per tensor, they cost a dozen Python objects and torch calls each (and a GIL
hand-off per torch call while the reading threads run): for the 18,144 derived tensors of
a Qwen3-30B-A3B-shaped file, 2.3 s of a 3.1 s converted load here (benchmarks/moe.py). For
a plain local file whose template goes straight into the parameters
(`loading.ConvertedFile.direct_targets`), `plan_runs` turns every run into three numpy
arrays (file offsets, memory addresses, lengths in bytes) read by a few ``preadv`` calls
(`read.scatter.read_at`); a column-tiled piece (``down_proj``) is read into one buffer per
run and put into its parameter's columns by one ``copy_``; the guard compares the middle
element of every copy with the file (`guard.Samples`). A run of any other file (encrypted,
remote, ``verify_hash``, a cast) is spelled out (`ExpertRun.needs`) and read as before.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..read.checks import truncated
from ..read.memory import has_preadv, make_present, populate
from ..read.scatter import read_at
from .guard import Samples, samples_of, stored_index

if TYPE_CHECKING:
    from .experts import ExpertRun
    from .loading import ConvertedFile
    from .regions import Need

__all__ = ["RunReads", "plan_runs", "read_runs", "check_runs"]


@dataclass
class _Check:
    """The guard's samples of one run's copy i: the middle element of each expert's copy."""

    flat: torch.Tensor  # the written storage, flat, of the parameter's dtype
    offsets: np.ndarray  # element offsets in `flat`, one per expert
    places: np.ndarray  # byte offsets of the file's elements
    dtype: torch.dtype  # the stored dtype
    names: list[str]
    index: list[int]  # the element's index in the written tensor
    element: int  # the checkpoint tensor's logical element


@dataclass
class RunReads:
    """The reads of every run taken as a whole (`plan_runs`)."""

    offsets: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    addresses: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    names: list[str] = field(default_factory=list)  # the tensor of each read
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # tiled
    checks: list[_Check] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)  # buffers the reads go into

    @property
    def bytes(self) -> int:
        return int(self.lengths.sum())

    def ranges(self) -> list[tuple[str, int, int]]:
        """(tensor, first byte, end byte) of every read, in file order."""
        ends = (self.offsets + self.lengths).tolist()
        return list(zip(self.names, self.offsets.tolist(), ends))


def plan_runs(converted: ConvertedFile, runs: list[ExpertRun], needs: dict[str, Need]) -> RunReads:
    """The reads of `runs` that can be read as a whole; the tensors of every other run go
    into `needs`, a `Need` each (read and checked as the meta pass's own)."""
    plan = _Plan(converted)
    for run in runs:
        if not plan.add(run):
            needs.update((need.name, need) for need in run.needs())
    return plan.finish()


class _Plan:
    def __init__(self, converted: ConvertedFile):
        self.converted = converted
        self.ok = converted.plain_local and not converted.verify and has_preadv()
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]] = []
        self.reads = RunReads()

    def add(self, run: ExpertRun) -> bool:
        """Plan `run`'s reads and checks; False (nothing planned) where it must be spelled
        out: not a plain local file, or its template is not one copy whose bytes go
        straight into a parameter of the stored dtype."""
        template = run.template
        if not self.ok or template.whole or len(template.copies) != 1:
            return False
        targets = self.converted.direct_targets(template.name, template)
        stored = self.converted.stored_dtype(template.name)
        if len(targets) != 1 or targets[0][2].dtype != stored:
            return False
        (lo, hi, destination), [step] = targets[0], run.steps
        tiles = self.converted.tiles.get(template.name, 0)
        shifts = np.asarray(run.shifts, dtype=np.int64)
        if (
            tiles
            and len(shifts) > 1
            and (len(set(np.diff(shifts).tolist())) != 1 or shifts[1] <= shifts[0])
        ):
            return False  # a tiled run's one copy needs its slots one stride apart, ascending
        starts = np.asarray(
            [self.converted.index[name].data_offset for name in run.names], dtype=np.int64
        )
        if tiles:
            addresses = self._tiled(destination, lo, hi, shifts, step, tiles, template)
        else:
            addresses = destination.data_ptr() + shifts * (step * destination.element_size())
        lengths = np.full(len(starts), hi - lo, dtype=np.int64)
        self.parts.append((starts + lo, addresses, lengths, run.names))
        self._check(run, destination, step, shifts, starts, stored, tiles)
        return True

    def _tiled(
        self,
        destination: torch.Tensor,
        lo: int,
        hi: int,
        shifts: np.ndarray,
        step: int,
        tiles: int,
        template: Need,
    ) -> np.ndarray:
        """Addresses in a new buffer for a tiled run's reads, and the copy that puts the
        buffer into the parameters' columns: ``[experts, tiles read, out, width]`` stored,
        into ``[experts, out, tiles read, width]`` of the experts' slots."""
        out, inputs = template.shape
        width, count, size = inputs // tiles, len(shifts), hi - lo
        buffer = torch.empty(count * size, dtype=torch.uint8)  # populated by its reader
        stored = buffer.view(destination.dtype).view(count, -1, out, width)
        read_tiles = stored.shape[1]
        delta = int(shifts[1] - shifts[0]) if count > 1 else 1
        rows = destination.stride(0)
        written = destination.as_strided(
            (count, out, read_tiles, width),
            (delta * step, rows, width, 1),
            destination.storage_offset() + int(shifts[0]) * step,
        )
        self.reads.copies.append((written, stored.permute(0, 2, 1, 3)))
        self.reads.keep.append(buffer)
        return buffer.data_ptr() + np.arange(count, dtype=np.int64) * size

    def _check(
        self,
        run: ExpertRun,
        destination: torch.Tensor,
        step: int,
        shifts: np.ndarray,
        starts: np.ndarray,
        stored: torch.dtype,
        tiles: int,
    ) -> None:
        """The guard's sample of each expert's copy: its middle element (`check_runs`)."""
        template = run.template
        shape = tuple(int(s) for s in destination.shape)
        view = template.views[0]
        found = samples_of(shape, tuple(destination.stride()), view, template.shape, tiles)
        if not found:
            return
        index, place, element = found[len(found) // 2]
        size = destination.untyped_storage().nbytes() // destination.element_size()
        byte = stored_index(element, template.shape, tiles) * stored.itemsize
        self.reads.checks.append(
            _Check(
                flat=destination.detach().as_strided((size,), (1,), 0),
                offsets=int(destination.storage_offset()) + place + shifts * step,
                places=starts + byte,
                dtype=stored,
                names=run.names,
                index=index,
                element=element,
            )
        )

    def finish(self) -> RunReads:
        reads = self.reads
        if self.parts:
            offsets = np.concatenate([p[0] for p in self.parts])
            order = np.argsort(offsets, kind="stable")
            reads.offsets = offsets[order]
            reads.addresses = np.concatenate([p[1] for p in self.parts])[order]
            reads.lengths = np.concatenate([p[2] for p in self.parts])[order]
            names = [name for p in self.parts for name in p[3]]
            reads.names = [names[i] for i in order.tolist()]
        return reads


def read_runs(path: str, reads: RunReads, threads: int, *, uri: str) -> int:
    """Read every run into its parameters (`threads` readers, each a contiguous share of
    the file at `path`), then put the tiled runs' buffers into their columns. Returns the
    ``preadv`` calls made.

    Raises:
        OSError: the file cannot be read.
        FormatError: it ends before a read does (naming `uri` and the tensor).
    """
    count = len(reads.offsets)
    if not count:
        return 0
    cuts = np.linspace(0, count, min(max(1, threads), count) + 1).astype(int).tolist()
    fd = os.open(path, os.O_RDONLY)

    def read(share: tuple[int, int]) -> int:
        a, b = share
        addresses, lengths = reads.addresses[a:b], reads.lengths[a:b]
        _populate(addresses, lengths)  # by each reader: the pages it is about to fill
        return read_at(fd, reads.offsets[a:b], addresses, lengths)

    def put(copy: tuple[torch.Tensor, torch.Tensor]) -> None:
        written, stored = copy
        make_present(written)
        written.copy_(stored)

    try:
        with ThreadPoolExecutor(len(cuts) - 1) as pool:
            calls = sum(pool.map(read, zip(cuts, cuts[1:])))
            list(pool.map(put, reads.copies))
    except EOFError as e:
        at = int(np.searchsorted(reads.offsets, int(e.args[0]), side="right")) - 1
        raise truncated(uri, reads.names[max(at, 0)]) from None
    finally:
        os.close(fd)
    reads.keep.clear()
    return calls


def _populate(addresses: np.ndarray, lengths: np.ndarray) -> None:
    """Make the pages under every ``[address, address + length)`` present, the ranges that
    meet merged first (a layer's experts lie one after another: a few calls per layer)."""
    if not len(addresses):
        return
    order = np.argsort(addresses, kind="stable")
    starts = addresses[order]
    ends = np.maximum.accumulate(starts + lengths[order])
    first = np.flatnonzero(np.concatenate(([True], starts[1:] > ends[:-1])))
    last = np.concatenate((first[1:] - 1, [len(starts) - 1]))
    for start, end in zip(starts[first].tolist(), ends[last].tolist()):
        populate(start, end - start)


def check_runs(reads: RunReads, model: nn.Module, source: Any) -> int:
    """Compare the middle element of every run copy into `model`'s parameters with the
    file's (`guard.Samples`); `source`: the file's elements (`guard.FileElements`), None
    where they cannot be re-read cheaply (nothing compared). Returns the elements compared.

    Raises:
        ModelMismatchError: an element differs, naming the parameter, tensor and element.
    """
    if source is None or not reads.checks:
        return 0
    names = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
    compared = 0
    for check in reads.checks:
        samples = Samples(check.flat)
        samples.offsets = check.offsets.tolist()
        samples.places = check.places.tolist()
        samples.about = [(name, check.index, check.element) for name in check.names]
        samples.check(names, source.gather(check.dtype, samples.places))
        compared += len(samples.offsets)
    return compared
