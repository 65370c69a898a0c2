"""The meta pass of a converted load (`convert.regions`): vLLM's ``load_weights`` run on meta
tensors to learn which bytes of each checkpoint tensor this rank copies where, on the first
two layers of each kind only (`convert.layers`) and, for a mixture-of-experts file, on two
experts per layer (`convert.experts`): the other layers' and experts' copies are derived
from theirs.

Which experts are this rank's comes from vLLM's fused-MoE layer (its global -> local expert
map, expert parallelism); a layer that does not have it goes through the whole meta pass.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...convert.experts import ExpertRun, plan_experts
from ...convert.layers import layer_numbers, plan_layers
from ...convert.loading import ConvertedFile
from ...convert.regions import CopyWatch

__all__ = ["run_meta_pass", "expert_slots"]


def expert_slots(model: nn.Module, prefix: str) -> list[int] | None:
    """The local slot of each global expert of vLLM's fused-MoE layer `prefix` (-1: another
    rank's), or None where `prefix` is no such layer, or its map is not one slot per local
    expert (redundant experts of EPLB)."""
    try:
        layer = model.get_submodule(prefix)
    except AttributeError:
        return None
    for module in layer.modules():
        to_local = getattr(module, "_map_global_expert_id_to_local_expert_id", None)
        total = getattr(module, "global_num_experts", None)
        count = getattr(module, "local_num_experts", None)
        if to_local is None or not isinstance(total, int) or not isinstance(count, int):
            continue
        slots = []
        for expert in range(total):
            try:
                slots.append(int(to_local(expert)))
            except (ValueError, IndexError):
                slots.append(-1)
        local = [s for s in slots if s >= 0]
        if len(local) != count or len(set(local)) != count:
            return None
        return slots
    return None


def run_meta_pass(
    model: Any, converted: ConvertedFile, watch: CopyWatch
) -> tuple[set[str] | None, list[ExpertRun]]:
    """Run ``model.load_weights`` on meta inputs under `watch` (already entered) and return
    what it says it loaded (None where it says nothing) and the runs of derived experts:
    every tensor but the experts `convert.experts` derives goes through ``load_weights``;
    the derived ones' copies are the runs' (`convert.experts.ExpertRun`, not in
    `watch.needs`); those that cannot be derived go through ``load_weights`` after."""
    layout = plan_experts(converted.entries, lambda prefix: expert_slots(model, prefix))
    skipped = layout.derived | layout.elsewhere
    params = dict(model.named_parameters())
    present = {n for name in params for n in layer_numbers(name)}

    def alike(name: str) -> tuple:  # what two layers' tensors of one kind share
        shape, dtype = converted.logical_shape(name), converted.stored_dtype(name)
        return tuple(shape), str(dtype), layout.slots_of(name)

    plan = plan_layers((n for n in converted.entries if n not in skipped), alike, present)
    loaded = _as_set(model.load_weights(converted.meta_inputs(watch, plan.first)))
    # later layers from the first of their kind, then (every layer's first two experts
    # recorded by now) each layer's other experts from its first two
    loaded = _meta_pass(model, converted, watch, plan.derive(watch, params, loaded), loaded)
    fallback = layout.derive(watch, converted.logical_shape)
    return _meta_pass(model, converted, watch, fallback, loaded), layout.runs


def _meta_pass(
    model: Any, converted: ConvertedFile, watch: CopyWatch, names: list[str], loaded: Any
) -> set[str] | None:
    """``load_weights`` on meta inputs of `names` (none: nothing run); what it says it
    loaded added to `loaded` (None where either says nothing)."""
    if not names:
        return loaded
    more = _as_set(model.load_weights(converted.meta_inputs(watch, names)))
    return None if loaded is None or more is None else loaded | more


def _as_set(loaded: Any) -> set[str] | None:
    return None if loaded is None else set(loaded)
