"""The meta pass on two experts per layer (`convert.experts`), without an engine: the copies
derived for a layer's other experts are exactly those the whole meta pass records, with
tensor parallelism (a rank's rows of gate/up, columns of down) and expert parallelism
(another rank's experts need nothing); where the first two experts do not differ by one
slot, the others are handed back for the meta pass.

The "weight loader" is what vLLM's fused-MoE loader does for one unquantized expert
tensor: narrow to the rank's share, copy into the expert's slot of ``w13_weight`` (gate
then up) or ``w2_weight``. The engine side (tokens against vLLM's default loader, the
bytes each expert-parallel rank reads) is tests/e2e/test_vllm_moe.py.
"""

from __future__ import annotations

import pytest
import torch

from tensorize_vllm_model.convert.experts import plan_experts
from tensorize_vllm_model.convert.regions import CopyWatch
from tests.support.experts import load_expert

EXPERTS, HIDDEN, INTER = 6, 8, 4
LAYERS = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")
SHAPES = {"gate_proj.weight": (INTER, HIDDEN), "up_proj.weight": (INTER, HIDDEN)}
SHAPES["down_proj.weight"] = (HIDDEN, INTER)


def names() -> list[str]:
    return [f"{layer}.{e}.{rest}" for layer in LAYERS for e in range(EXPERTS) for rest in SHAPES]


def shape_of(name: str) -> tuple[int, ...]:
    return SHAPES[name.split(".", 6)[6]]


class Layer:
    """A layer's stacked expert weights of one rank: `slots` (global -> local, -1: not
    this rank's), TP rank `tp` of `tps`."""

    def __init__(self, slots: list[int], tp: int = 0, tps: int = 1):
        local = max(slots) + 1
        self.slots, self.tp, self.share = slots, tp, INTER // tps
        self.w13 = torch.zeros(local, 2 * self.share, HIDDEN)
        self.w2 = torch.zeros(local, HIDDEN, self.share)

    def load(self, name: str, tensor: torch.Tensor) -> None:
        load_expert(self.w13, self.w2, self.slots, self.tp, name, tensor)


def copies(watch: CopyWatch, name: str) -> list:
    need = watch.needs[name]
    return [
        (box, d.untyped_storage().data_ptr(), d.storage_offset(), tuple(d.shape), d.stride())
        for box, d in need.copies
    ] + [need.views]


def meta_pass(layers: dict, tensor_names: list[str]) -> CopyWatch:
    watch = CopyWatch()
    with watch:
        for name in tensor_names:
            meta = watch.meta_input(name, shape_of(name), torch.float32)
            layers[name.rsplit(".", 3)[0]].load(name, meta)
    return watch


@pytest.mark.parametrize(
    "slots, tp, tps",
    [
        (list(range(EXPERTS)), 0, 1),
        (list(range(EXPERTS)), 1, 2),  # a TP rank's rows of gate/up, columns of down
        ([-1, -1, -1, 0, 1, 2], 0, 1),  # expert parallelism: experts 3-5 here
        ([0, 1, 2, -1, -1, -1], 1, 2),
    ],
)
def test_derived_copies_are_the_whole_meta_pass(slots, tp, tps):
    whole = meta_pass({layer: Layer(slots, tp, tps) for layer in LAYERS}, names())
    layers = {layer: Layer(slots, tp, tps) for layer in LAYERS}
    layout = plan_experts(names(), lambda prefix: layers[prefix].slots)
    local = [e for e in range(EXPERTS) if slots[e] >= 0]
    assert {int(n.split(".")[5]) for n in layout.derived} == set(local[2:])
    assert {int(n.split(".")[5]) for n in layout.elsewhere} == set(range(EXPERTS)) - set(local)
    watch = meta_pass(layers, [n for n in names() if n not in layout.derived | layout.elsewhere])
    assert layout.derive(watch, shape_of) == []
    assert all(n not in watch.needs for n in layout.derived)  # runs, not a Need each
    layout.spread(watch.needs)
    for name in names():
        if name in layout.elsewhere:
            assert name not in watch.needs or not watch.needs[name].needed
            continue
        assert watch.needs[name].boxes == whole.needs[name].boxes
        assert watch.needs[name].views == whole.needs[name].views
        # the same place in its layer's parameters: offsets and shapes agree
        assert [c[2:] for c in copies(watch, name)[:-1]] == [
            c[2:] for c in copies(whole, name)[:-1]
        ]


def test_derived_copies_write_what_the_loader_writes():
    """The derived copies, done with real tensors, fill the parameters as the loader does."""
    slots = list(range(EXPERTS))
    reference = {layer: Layer(slots) for layer in LAYERS}
    tensors = {n: torch.randn(shape_of(n)) for n in names()}
    for name, tensor in tensors.items():
        reference[name.rsplit(".", 3)[0]].load(name, tensor)
    layers = {layer: Layer(slots) for layer in LAYERS}
    layout = plan_experts(names(), lambda prefix: layers[prefix].slots)
    watch = meta_pass(layers, [n for n in names() if n not in layout.derived])
    layout.derive(watch, shape_of)
    layout.spread(watch.needs)
    for name, need in watch.needs.items():
        for (_, destination), view in zip(need.copies, need.views):
            source = tensors[name].reshape(-1).as_strided(view.sizes, view.strides, view.offset)
            destination.copy_(source)
    for layer in LAYERS:
        assert torch.equal(layers[layer].w13, reference[layer].w13)
        assert torch.equal(layers[layer].w2, reference[layer].w2)


def test_experts_not_one_slot_apart_go_through_the_meta_pass():
    """Slots out of order (expert 1 before expert 0) or a layer vLLM does not have: the
    layer's other experts are handed back, or not planned at all."""
    slots = [1, 0, 2, 3, 4, 5]
    layers = {LAYERS[0]: Layer(slots), LAYERS[1]: Layer(list(range(EXPERTS)))}
    layout = plan_experts(names(), lambda p: layers[p].slots if p == LAYERS[0] else None)
    assert all(n.startswith(LAYERS[0]) for n in layout.derived)
    watch = meta_pass(layers, [n for n in names() if n not in layout.derived])
    fallback = layout.derive(watch, shape_of)
    assert sorted(fallback) == sorted(layout.derived)


@pytest.mark.parametrize("first", [0, 1, 3])  # the template's slot in a stack of 6
def test_a_run_takes_exactly_the_shifts_that_stay_inside_the_stacked_weight(first):
    """`_shifts`' one range per run equals a check of every shift on its own: each of the
    template's copies, moved by the shift, starts and ends inside its storage."""
    from tensorize_vllm_model.convert.experts import ExpertRun, _shifts
    from tensorize_vllm_model.convert.regions import Need

    w13 = torch.zeros(6, 2 * INTER, HIDDEN)
    w2 = torch.zeros(6, HIDDEN, INTER)
    gate = w13[first, :INTER]  # rows of the slot
    down = w2[first, :, 1:3]  # columns of the slot (a TP rank's share)
    template = Need("t", (INTER, HIDDEN), boxes=[None, None], copies=[(None, gate), (None, down)])
    run = ExpertRun(template, steps=[w13[0].numel(), w2[0].numel()])

    def inside(shift: int) -> bool:
        for (_, x), step in zip(template.copies, run.steps):
            start = x.storage_offset() + shift * step
            end = start + sum((s - 1) * st for s, st in zip(x.shape, x.stride()))
            if start < 0 or end >= x.untyped_storage().nbytes() // x.element_size():
                return False
        return True

    low, high = _shifts(run)
    assert [s for s in range(-10, 11) if low <= s <= high] == [
        s for s in range(-10, 11) if inside(s)
    ]
    assert (low, high) == (-first, 5 - first)
