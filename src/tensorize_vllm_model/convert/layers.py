"""The meta pass of a converted file on two layers of each kind instead of all of them.

vLLM's ``load_weights`` loads every decoder layer the same way: layer k's ``q_proj`` is
narrowed and copied into layer k's ``qkv_proj`` exactly as layer 0's into layer 0's. So of
the layers whose checkpoint tensors have the same names (but the layer number), shapes and
dtypes (a kind: a dense and a mixture-of-experts layer are two kinds), only the first two
this rank holds go through the meta pass (`regions.CopyWatch`); the copies of the others
are the first one's, moved onto the same parameter of their own layer (`LayerPlan.derive`).
That holds only where the second layer's recorded copies are exactly the first's so moved,
where every copy lands in a parameter (not a loader's scratch tensor), where nothing but
those copies wrote into the first two layers' parameters during the pass (a loader that
fills or rescales a parameter), and where the other layer has the same parameters (same
shape, strides, dtype); a layer or kind that fails goes through the meta pass as before.
The guard (`guard.check_loaded`) then samples every derived copy against the file.

For a Qwen3-30B-A3B-shaped file: 33 tensors through the meta pass instead of 723.
Plain torch: the parameters come from the caller (`integrations.vllm.meta_pass`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .regions import CopyWatch, Need

__all__ = ["LayerPlan", "plan_layers", "layer_of", "layer_numbers", "same_needs"]

_LAYER = re.compile(r"^(.*?\b(?:layers|h|blocks)\.)(\d+)\.(.+)$")
_NUMBER = re.compile(r"\b(?:layers|h|blocks)\.(\d+)\.")


def layer_of(name: str) -> tuple[str, int, str] | None:
    """(prefix, layer number, rest) of a layer's tensor name (``model.layers.3.mlp.x`` ->
    ``("model.layers.", 3, "mlp.x")``); None for a tensor of no layer."""
    match = _LAYER.match(name)
    return None if match is None else (match[1], int(match[2]), match[3])


def layer_numbers(name: str) -> set[int]:
    """The layer numbers in a parameter's or tensor's name (``model.layers.3.x`` -> {3})."""
    return {int(n) for n in _NUMBER.findall(name)}


def _renumbered(name: str, old: int, new: int) -> str | None:
    """`name` (a parameter's) with its one layer number `old` made `new`; None where it
    holds no such number or more than one."""
    found = [m for m in _NUMBER.finditer(name) if int(m[1]) == old]
    if len(found) != 1:
        return None
    start, end = found[0].span(1)
    return f"{name[:start]}{new}{name[end:]}"


@dataclass
class _Kind:
    layers: list[int]  # in order
    names: dict[int, dict[str, str]] = field(default_factory=dict)  # layer -> rest -> name


@dataclass
class LayerPlan:
    """Which tensors go through the meta pass first (`first`: those of no layer, of the
    first two layers of each kind and of kinds with fewer than three layers) and the kinds
    whose other layers are derived from those (`derive`)."""

    first: list[str] = field(default_factory=list)
    kinds: list[_Kind] = field(default_factory=list)

    def derive(
        self, watch: CopyWatch, params: dict[str, torch.Tensor], loaded: set[str] | None
    ) -> list[str]:
        """Put into `watch.needs` the copies of every later layer's tensors, from the first
        layer of its kind (which the meta pass recorded), and the names of the parameters so
        loaded into `loaded`. Returns the later tensors that could not be derived so: they
        need the meta pass themselves."""
        owners = _owners(params)
        # layers a parameter of which was written by anything but a recorded copy
        touched = {
            n
            for name, tensor in params.items()
            if tensor.untyped_storage().data_ptr() in watch.touched
            for n in layer_numbers(name)
        }
        fallback: list[str] = []
        for kind in self.kinds:
            first, second, *others = kind.layers
            moved = _Mover(watch, params, owners, kind, first)
            if (
                {first, second} & touched
                or not moved.templates_ok()
                or not same_needs(moved.layer(second), _recorded(watch, kind, second))
            ):
                fallback.extend(n for k in others for n in kind.names[k].values())
                continue
            templates = [n for n in loaded or () if first in layer_numbers(n)]
            for layer in others:
                needs = moved.layer(layer)
                if needs is None:
                    fallback.extend(kind.names[layer].values())
                    continue
                watch.needs.update((need.name, need) for need in needs)
                if loaded is not None:
                    loaded.update(moved.renamed(templates, layer))
        return fallback


def plan_layers(
    names: Iterable[str], key: Callable[[str], Hashable], present: set[int] | None = None
) -> LayerPlan:
    """Group the layers' tensors among `names` by kind.

    Args:
        names: the tensors the meta pass would see, in file order.
        key: what makes two tensors of a layer alike (their shape and dtype, say), by name.
        present: the layer numbers this rank holds (pipeline parallelism), if known: the
            first two layers of a kind are chosen among them.
    """
    plan = LayerPlan()
    kinds: dict[tuple[str, Hashable], _Kind] = {}
    by_layer: dict[tuple[str, int], dict[str, str]] = {}
    for name in names:
        found = layer_of(name)
        if found is None:
            plan.first.append(name)
        else:
            by_layer.setdefault((found[0], found[1]), {})[found[2]] = name
    for (prefix, layer), rests in sorted(by_layer.items()):
        signature = (prefix, tuple(sorted((rest, key(n)) for rest, n in rests.items())))
        kind = kinds.setdefault(signature, _Kind([]))
        kind.layers.append(layer)
        kind.names[layer] = rests
    for kind in kinds.values():
        if present is not None:  # this rank's layers first: they are the templates
            kind.layers.sort(key=lambda k: (k not in present, k))
        if len(kind.layers) >= 3:
            plan.kinds.append(kind)
            plan.first.extend(kind.names[kind.layers[0]].values())
            plan.first.extend(kind.names[kind.layers[1]].values())
        else:
            plan.first.extend(n for k in kind.layers for n in kind.names[k].values())
    return plan


def _owners(params: dict[str, torch.Tensor]) -> dict[int, str | None]:
    """Storage address -> the one parameter on it (None where several share it)."""
    owners: dict[int, str | None] = {}
    for name, tensor in params.items():
        address = tensor.untyped_storage().data_ptr()
        owners[address] = None if address in owners else name
    return owners


class _Mover:
    """The first layer of a kind's recorded needs, moved onto another layer's parameters."""

    def __init__(
        self,
        watch: CopyWatch,
        params: dict[str, torch.Tensor],
        owners: dict[int, str | None],
        kind: _Kind,
        first: int,
    ):
        self.watch, self.params, self.owners = watch, params, owners
        self.kind, self.first = kind, first

    def templates_ok(self) -> bool:
        """Whether the first layer's needs were all recorded and copied at least once."""
        needs = [self.watch.needs.get(n) for n in self.kind.names[self.first].values()]
        return all(needs) and any(n.copies for n in needs if n is not None)

    def layer(self, layer: int) -> list[Need] | None:
        """The first layer's needs moved onto `layer`'s parameters; None where one of its
        copies cannot be moved (no such parameter there, another layout)."""
        found = []
        for rest, name in self.kind.names[self.first].items():
            template = self.watch.needs[name]
            copies = []
            for box, x in template.copies:
                target = self._moved(x, layer)
                if target is None:
                    return None
                copies.append((box, target))
            found.append(
                Need(
                    self.kind.names[layer][rest],
                    template.shape,
                    boxes=list(template.boxes),
                    whole=template.whole,
                    copies=copies,
                    views=list(template.views),
                )
            )
        return found

    def _moved(self, x: torch.Tensor, layer: int) -> torch.Tensor | None:
        name = self.owners.get(x.untyped_storage().data_ptr())
        if name is None:  # not a parameter, or one of several on this storage
            return None
        other = _renumbered(name, self.first, layer)
        if other is None or other not in self.params:
            return None
        a, b = self.params[name], self.params[other]
        if not _same_layout(a, b):
            return None
        return torch.as_strided(b, x.shape, x.stride(), x.storage_offset())

    def renamed(self, names: Iterable[str], layer: int) -> list[str]:
        """The parameters of `layer` that stand where the first layer's `names` do."""
        moved = (_renumbered(name, self.first, layer) for name in names)
        return [name for name in moved if name is not None and name in self.params]


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.storage_offset() == b.storage_offset()
        and a.untyped_storage().nbytes() == b.untyped_storage().nbytes()
        and a.device == b.device
    )


def _recorded(watch: CopyWatch, kind: _Kind, layer: int) -> list[Need] | None:
    """The needs the meta pass recorded for `layer`, in the first layer's order."""
    first = kind.layers[0]
    needs = [watch.needs.get(kind.names[layer].get(rest, "")) for rest in kind.names[first]]
    return None if any(n is None for n in needs) else needs  # type: ignore[return-value]


def same_needs(a: Sequence[Need] | None, b: Sequence[Need] | None) -> bool:
    """Whether two lists of needs copy the same boxes the same way into the same places."""
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if (x.name, x.shape, x.boxes, x.whole, x.views) != (
            y.name,
            y.shape,
            y.boxes,
            y.whole,
            y.views,
        ):
            return False
        if len(x.copies) != len(y.copies):
            return False
        for (box_x, t), (box_y, u) in zip(x.copies, y.copies):
            if box_x != box_y or not _same_place(t, u):
                return False
    return True


def _same_place(t: torch.Tensor, u: torch.Tensor) -> bool:
    return (
        t.untyped_storage().data_ptr() == u.untyped_storage().data_ptr()
        and t.storage_offset() == u.storage_offset()
        and t.shape == u.shape
        and t.stride() == u.stride()
        and t.dtype == u.dtype
    )
