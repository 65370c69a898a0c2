"""The meta pass on two layers of each kind (`convert.layers`), without an engine: the copies
derived for the other layers are exactly those the whole meta pass records (merged q/k/v
at TP=1 and on a TP rank); a layer whose parameters are missing (another pipeline stage)
or laid out otherwise, a kind whose second layer is not the first one moved, and a loader
that writes a parameter by anything but a copy send those layers back to the meta pass.

The "model" is what vLLM's merged-QKV loader does for one tensor: narrow to the rank's
heads, copy into the q, k or v rows of the layer's ``qkv_proj.weight``; a norm is copied
whole. The engine side (every parameter of 18 families against vLLM's default loader with
five layers) is ``benchmarks/families_weights.py --layers 5`` (docs/convert.md).
"""

from __future__ import annotations

import pytest
import torch

from tensorize_vllm_model.convert.layers import layer_of, plan_layers, same_needs
from tensorize_vllm_model.convert.regions import CopyWatch

HIDDEN, LAYERS = 8, 5
PIECES = {"q_proj": 8, "k_proj": 4, "v_proj": 4}


def checkpoint(layers: int = LAYERS, wide: int | None = None) -> dict[str, tuple[int, ...]]:
    """name -> shape; layer `wide` (if any) has a wider norm: a kind of its own."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (16, HIDDEN)}
    for k in range(layers):
        for piece, rows in PIECES.items():
            shapes[f"model.layers.{k}.self_attn.{piece}.weight"] = (rows, HIDDEN)
        norm = 2 * HIDDEN if k == wide else HIDDEN
        shapes[f"model.layers.{k}.input_layernorm.weight"] = (norm,)
    return shapes


class Model:
    """One rank's parameters (TP rank `tp` of `tps`), layers `present` only, and the
    loader vLLM would run for each checkpoint tensor."""

    def __init__(self, shapes, tp=0, tps=1, present=None, fill_norms=False):
        self.tp, self.tps, self.fill_norms = tp, tps, fill_norms
        self.params: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": torch.zeros(16, HIDDEN)
        }
        rows = sum(PIECES.values()) // tps
        for name, shape in shapes.items():
            found = layer_of(name)
            if found is None or (present is not None and found[1] not in present):
                continue
            base = f"model.layers.{found[1]}."
            if name.endswith("layernorm.weight"):
                self.params[name] = torch.zeros(shape)
            else:
                self.params.setdefault(
                    base + "self_attn.qkv_proj.weight", torch.zeros(rows, HIDDEN)
                )

    def load(self, name: str, tensor: torch.Tensor) -> None:
        found = layer_of(name)
        if found is None:
            self.params[name].copy_(tensor)
            return
        base = f"model.layers.{found[1]}."
        if name.endswith("layernorm.weight"):
            if base + "input_layernorm.weight" not in self.params:
                return  # another stage's layer: skipped, as vLLM skips it
            target = self.params[base + "input_layernorm.weight"]
            if self.fill_norms:
                target.fill_(1.0)  # a loader that writes more than the copy
            target.copy_(tensor)
            return
        qkv = self.params.get(base + "self_attn.qkv_proj.weight")
        if qkv is None:
            return
        piece = found[2].split(".")[1]
        share = PIECES[piece] // self.tps
        start = sum(PIECES[p] // self.tps for p in list(PIECES)[: list(PIECES).index(piece)])
        qkv[start : start + share].copy_(tensor.narrow(0, self.tp * share, share))


def meta_pass(model: Model, shapes: dict, names) -> CopyWatch:
    watch = CopyWatch()
    with watch:
        for name in names:
            model.load(name, watch.meta_input(name, shapes[name], torch.float32))
    return watch


def derived(model: Model, shapes: dict, present=None):
    """The meta pass on the plan's first tensors, the rest derived: (watch, fallback)."""
    plan = plan_layers(list(shapes), lambda n: shapes[n], present)
    watch = meta_pass(model, shapes, plan.first)
    loaded: set[str] = set()
    fallback = plan.derive(watch, model.params, loaded)
    return watch, fallback, plan, loaded


@pytest.mark.parametrize("tp, tps", [(0, 1), (1, 2)])
def test_derived_copies_are_the_whole_meta_pass(tp, tps):
    shapes = checkpoint()
    whole = meta_pass(Model(shapes, tp, tps), shapes, list(shapes))
    model = Model(shapes, tp, tps)
    watch, fallback, plan, _ = derived(model, shapes)
    assert fallback == []
    assert watch.inputs == 1 + 2 * 4  # the embedding and layers 0 and 1 only
    for name in shapes:
        ours, theirs = watch.needs[name], whole.needs[name]
        assert (ours.boxes, ours.views, ours.whole) == (theirs.boxes, theirs.views, theirs.whole)
        places = [(d.storage_offset(), tuple(d.shape), d.stride()) for _, d in ours.copies]
        assert places == [
            (d.storage_offset(), tuple(d.shape), d.stride()) for _, d in theirs.copies
        ]
    # each derived copy lands in its own layer's parameter
    copy = watch.needs["model.layers.4.self_attn.k_proj.weight"].copies[0][1]
    qkv = model.params["model.layers.4.self_attn.qkv_proj.weight"]
    assert copy.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()


def test_loaded_names_are_moved_to_every_derived_layer():
    shapes = checkpoint()
    model = Model(shapes)
    plan = plan_layers(list(shapes), lambda n: shapes[n])
    watch = meta_pass(model, shapes, plan.first)
    loaded = {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.input_layernorm.weight"}
    plan.derive(watch, model.params, loaded)
    assert "model.layers.4.self_attn.qkv_proj.weight" in loaded
    assert "model.layers.3.input_layernorm.weight" in loaded


def test_a_layer_of_another_kind_goes_through_the_meta_pass():
    shapes = checkpoint(wide=3)
    watch, fallback, plan, _ = derived(Model(shapes), shapes)
    assert "model.layers.3.input_layernorm.weight" in plan.first  # a kind of one layer
    assert fallback == []
    assert watch.inputs == 1 + 3 * 4


def test_another_stages_layers_go_back_to_the_meta_pass():
    shapes = checkpoint()
    present = {2, 3, 4}
    model = Model(shapes, present=present)
    watch, fallback, plan, _ = derived(model, shapes, present)
    # layers 2 and 3 are the templates; 0 and 1 have no parameters here: handed back
    assert {layer_of(n)[1] for n in plan.first if layer_of(n)} == {2, 3}
    assert {layer_of(n)[1] for n in fallback} == {0, 1}
    assert watch.needs["model.layers.4.self_attn.q_proj.weight"].copies


def test_a_loader_that_writes_more_than_copies_is_not_derived():
    shapes = checkpoint()
    watch, fallback, _, _ = derived(Model(shapes, fill_norms=True), shapes)
    assert {layer_of(n)[1] for n in fallback} == {2, 3, 4}


def test_a_second_layer_loaded_otherwise_stops_the_derivation():
    shapes = checkpoint()
    model = Model(shapes)
    plan = plan_layers(list(shapes), lambda n: shapes[n])
    watch = meta_pass(model, shapes, plan.first)
    # layer 1's k rows recorded one row further on than layer 0's
    need = watch.needs["model.layers.1.self_attn.k_proj.weight"]
    box, x = need.copies[0]
    need.copies[0] = (box, torch.as_strided(x, x.shape, x.stride(), x.storage_offset() + HIDDEN))
    fallback = plan.derive(watch, model.params, None)
    assert {layer_of(n)[1] for n in fallback} == {2, 3, 4}


def test_same_needs_compares_places_not_values():
    shapes = checkpoint()
    a = meta_pass(Model(shapes), shapes, list(shapes))
    needs = [a.needs[n] for n in shapes]
    assert same_needs(needs, needs)
    assert not same_needs(needs, needs[:-1])
    assert not same_needs(None, needs)


@pytest.mark.parametrize(
    "name, found",
    [
        ("model.layers.12.mlp.down_proj.weight", ("model.layers.", 12, "mlp.down_proj.weight")),
        ("transformer.h.3.attn.c_attn.weight", ("transformer.h.", 3, "attn.c_attn.weight")),
        ("model.norm.weight", None),
        ("model.mylayers.2.x", None),
    ],
)
def test_layer_of(name, found):
    assert layer_of(name) == found


def test_a_write_into_the_second_layers_parameters_stops_the_derivation():
    shapes = checkpoint()
    model = Model(shapes)
    plan = plan_layers(list(shapes), lambda n: shapes[n])
    watch = meta_pass(model, shapes, plan.first)
    # as if a loader had filled layer 1's norm after its copy (not a recorded copy)
    watch.touched.add(model.params["model.layers.1.input_layernorm.weight"].data_ptr())
    fallback = plan.derive(watch, model.params, None)
    assert {layer_of(n)[1] for n in fallback} == {2, 3, 4}
