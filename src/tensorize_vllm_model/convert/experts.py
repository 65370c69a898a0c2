"""The meta pass of a mixture-of-experts file, run on two experts per layer instead of all.

vLLM's ``load_weights`` handles a checkpoint's experts one tensor at a time (transformers
saves each expert's projections as tensors of their own: 18,432 of the 18,867 tensors of a
Qwen3-30B-A3B-shaped checkpoint), and the meta pass (`regions.CopyWatch`) ran all of them
through vLLM's per-expert weight loaders: 3-12 s of a converted load that otherwise takes
about a second. Every expert of a layer is loaded the same way, into its own slot of the
layer's stacked parameters (``w13_weight[e]``, ``w2_weight[e]``): the same boxes of the
checkpoint tensor, the same views, written one slot further on. So only the first two of a
layer's local experts go through the meta pass; the copies of the others are those of the
first, moved by their slot (`ExpertLayout.derive`). Where the two experts' copies do not
differ by exactly one slot step (a loader that does more than narrow and copy, another
layout), the layer's other experts go through the meta pass as before (`fallback`). The
guard (`guard.check_loaded`) then samples every derived copy against the file, as every
other.

Plain torch: which experts are this rank's (expert parallelism) comes from the caller
(`integrations.vllm.loader`), as a table global expert -> local slot (-1: not this rank's).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .regions import CopyWatch, Need

__all__ = ["ExpertLayout", "ExpertRun", "plan_experts"]

_EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(.+)$")


@dataclass
class _Layer:
    slots: list[int]  # global expert -> local slot (-1: another rank's)
    names: dict[int, dict[str, str]] = field(default_factory=dict)  # expert -> rest -> name

    def local(self) -> list[int]:
        """This rank's experts (global ids, ascending) that the file holds."""
        return [e for e in sorted(self.names) if 0 <= e < len(self.slots) and self.slots[e] >= 0]


@dataclass
class ExpertRun:
    """A layer's derived experts for one checkpoint piece (``gate_proj.weight``, ...): each
    is copied as `template` (the layer's first local expert's `Need`, which the meta pass
    recorded), into its own slot: `shifts[k]` slots past the template's for `names[k]`,
    `steps[i]` storage elements per slot for the template's copy i. Kept as one run, not a
    `Need` per expert, so that a plain local file reads and checks the run as a whole
    (`convert.runs`); `needs` spells it out per expert for every other read."""

    template: Need
    names: list[str] = field(default_factory=list)
    shifts: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def needs(self) -> list[Need]:
        """One `Need` per derived tensor: the template's copies moved by its slots."""
        pairs = zip(self.names, self.shifts)
        return [_moved(self.template, name, shift, self.steps) for name, shift in pairs]


@dataclass
class ExpertLayout:
    """Which expert tensors skip the meta pass (`derived`: their copies come from the
    layer's first two experts') and which need no read at all (`elsewhere`: experts of
    other expert-parallel ranks); once derived, the `runs` that hold their copies."""

    layers: dict[str, _Layer] = field(default_factory=dict)
    derived: set[str] = field(default_factory=set)
    elsewhere: set[str] = field(default_factory=set)
    runs: list[ExpertRun] = field(default_factory=list)

    def derive(self, watch: CopyWatch, shape_of: Callable[[str], Sequence[int]]) -> list[str]:
        """Record in `runs` the copies of every derived tensor, from its layer's first two
        local experts' copies (which the meta pass recorded in `watch`). Returns the derived
        tensors that could not be derived so: they need the meta pass themselves."""
        fallback: list[str] = []
        for layer in self.layers.values():
            local = layer.local()
            if len(local) < 3:
                continue
            first, second = local[0], local[1]
            for rest, name in layer.names[first].items():
                template = watch.needs.get(name)
                other = watch.needs.get(layer.names[second].get(rest, ""))
                steps = _steps(template, other, layer.slots[second] - layer.slots[first])
                run, low, high = None, 0, -1
                if steps is not None and template is not None:
                    run = ExpertRun(template, steps=steps)
                    low, high = _shifts(run)
                for expert in local[2:]:
                    target = layer.names[expert].get(rest)
                    if target is None:
                        continue
                    shift = layer.slots[expert] - layer.slots[first]
                    if (
                        run is None
                        or not low <= shift <= high
                        or tuple(shape_of(target)) != run.template.shape
                    ):
                        fallback.append(target)
                    else:
                        run.names.append(target)
                        run.shifts.append(shift)
                if run is not None and run.names:
                    self.runs.append(run)
        return fallback

    def slots_of(self, name: str) -> tuple[int, ...] | None:
        """The slot table of the layer whose expert tensor `name` is (None: not an expert
        tensor, or of a layer without one)."""
        match = _EXPERT.match(name)
        layer = self.layers.get(match[1]) if match else None
        return tuple(layer.slots) if layer else None

    def spread(self, needs: dict[str, Need]) -> None:
        """Put every run's tensors into `needs`, a `Need` each (`ExpertRun.needs`)."""
        for run in self.runs:
            needs.update((need.name, need) for need in run.needs())


def plan_experts(names: Iterable[str], slots_of: Callable[[str], list[int] | None]) -> ExpertLayout:
    """Group the expert tensors among `names` (``<layer>.experts.<e>.<rest>``) by layer.

    Args:
        names: the file's tensor names.
        slots_of: ``layer prefix -> [local slot of each global expert] (-1: another
            rank's)``, or None where the model has no such layer (then that layer's
            experts all go through the meta pass).
    """
    layout = ExpertLayout()
    found: dict[str, dict[int, dict[str, str]]] = {}
    for name in names:
        match = _EXPERT.match(name)
        if match is not None:
            prefix, expert, rest = match.groups()
            found.setdefault(prefix, {}).setdefault(int(expert), {})[rest] = name
    for prefix, experts in found.items():
        slots = slots_of(prefix)
        if slots is None:
            continue
        layer = _Layer(slots, experts)
        layout.layers[prefix] = layer
        local = layer.local()
        for expert, by_rest in experts.items():
            if expert not in local:
                if 0 <= expert < len(slots):
                    layout.elsewhere.update(by_rest.values())
            elif expert not in local[:2]:
                layout.derived.update(by_rest.values())
    return layout


def _steps(a: Need | None, b: Need | None, slots: int) -> list[int] | None:
    """Storage elements per slot of each of `a`'s copies, where `b` (an expert `slots`
    slots further on) has the same boxes and views and each copy writes the same shape
    exactly that many slots further into the same storage; else None."""
    if a is None or b is None or a.whole or b.whole or not a.copies or slots <= 0:
        return None
    if a.boxes != b.boxes or a.views != b.views or len(a.copies) != len(b.copies):
        return None
    steps = []
    for (_, x), (_, y) in zip(a.copies, b.copies):
        same = (
            x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
            and x.shape == y.shape
            and x.stride() == y.stride()
            and x.dtype == y.dtype
        )
        delta = int(y.storage_offset()) - int(x.storage_offset())  # SymInt in torch's stubs
        if not same or delta <= 0 or delta % slots:
            return None
        steps.append(delta // slots)
    return steps


def _shifts(run: ExpertRun) -> tuple[int, int]:
    """The slots past the template (fewest, most) to which every one of the template's
    copies can be moved and stay inside its storage: a tensor of the template's shape
    there can take them. Each copy moves by its step (> 0) per slot, so the bounds are
    linear in the shift: one range per run, not a check per expert (18,144 of them in a
    Qwen3-MoE-shaped file)."""
    low, high = -(1 << 62), 1 << 62
    for (_, x), step in zip(run.template.copies, run.steps):
        first = int(x.storage_offset())
        last = first + sum((s - 1) * st for s, st in zip(x.shape, x.stride()) if s)
        size = x.untyped_storage().nbytes() // x.element_size()
        low = max(low, -(first // step))  # first + shift * step >= 0
        high = min(high, (size - 1 - last) // step)  # last + shift * step < size
    return low, high


def _moved(template: Need, name: str, shift: int, steps: list[int]) -> Need:
    """`template`'s copies, each written `shift` slots further on, for tensor `name` (of the
    template's shape, the moved copies inside their storages: `_shifts`)."""
    copies = [
        (box, torch.as_strided(x, x.shape, x.stride(), x.storage_offset() + shift * step))
        for (box, x), step in zip(template.copies, steps)
    ]
    return Need(
        name,
        template.shape,
        boxes=list(template.boxes),
        copies=copies,
        views=list(template.views),
    )
