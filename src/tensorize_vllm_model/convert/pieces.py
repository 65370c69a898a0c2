"""Whether a checkpoint holds every piece of the weights vLLM merges, from tensor names.

vLLM loads several checkpoint tensors into one parameter: q/k/v into ``qkv_proj``,
gate/up into ``gate_up_proj`` (its models' ``packed_modules_mapping``), and every expert's
gate/up/down (``w1``/``w3``/``w2``) into a layer's fused expert weights. A checkpoint
missing one piece leaves that part of the parameter as the memory held: vLLM 0.32's
loaders and this package's loaded it silently; vLLM 0.34's default loader refuses it
("Following weights were not initialized from checkpoint"). `check_pieces` refuses it
before the engine serves, naming the checkpoint tensor that is missing, whatever vLLM's
version: the same rule for a converted file (its tensors' names) and for ``serialize``
(the checkpoint's names, before vLLM's default loader reads them).

The rule, per ``<module>.<piece>.<weight|bias>``: when some pieces of a merged group are
present, all must be (a group none of whose pieces is present is another layout, e.g. a
checkpoint that stores ``qkv_proj`` itself, or DeepSeek's MLA with no ``k_proj``); in a
layer with experts (``...experts.<e>.<piece>...``), every expert of the config's count
(``num_experts``, ``num_local_experts``, ``n_routed_experts``) must hold every piece its
family has (``gate_proj``/``up_proj``/``down_proj`` or ``w1``/``w2``/``w3``).
Pure Python: no vLLM, no tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ..core.errors import ModelMismatchError

__all__ = ["DEFAULT_PACKED", "EXPERT_FAMILIES", "missing_pieces", "check_pieces"]

# vLLM's packed_modules_mapping of Llama/Qwen/Mistral-style models (vLLM 0.32-0.34), for a
# model that does not say.
DEFAULT_PACKED: dict[str, list[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}
EXPERT_FAMILIES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w2", "w3"))
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_CHECKED = ("weight", "bias")
_EXPERT = re.compile(
    r"^(?P<layer>.*\.experts)\.(?P<expert>\d+)\.(?P<piece>[^.]+)\.(?P<kind>[^.]+)$"
)


def _groups(
    names: set[str], packed: Mapping[str, Sequence[str]]
) -> Iterable[tuple[str, list[str]]]:
    """(merged parameter, its missing checkpoint tensors) of every group partly present."""
    member_of = {piece: merged for merged, pieces in packed.items() for piece in pieces}
    seen: dict[tuple[str, str, str], set[str]] = {}
    for name in names:
        module, _, kind = name.rpartition(".")
        prefix, _, piece = module.rpartition(".")
        if kind in _CHECKED and piece in member_of:
            seen.setdefault((prefix, member_of[piece], kind), set()).add(piece)
    for (prefix, merged, kind), present in sorted(seen.items()):
        absent = [p for p in packed[merged] if p not in present]
        if absent:
            where = f"{prefix}." if prefix else ""
            yield f"{where}{merged}", [f"{where}{p}.{kind}" for p in absent]


def _experts(names: set[str], config: Mapping) -> Iterable[tuple[str, list[str]]]:
    """(a layer's experts, their missing checkpoint tensors) of every layer with experts."""
    count = next((int(config[k]) for k in _EXPERT_COUNT_KEYS if config.get(k)), 0)
    layers: dict[tuple[str, str], tuple[set[int], set[str]]] = {}
    for name in names:
        found = _EXPERT.match(name)
        if found is None or found["kind"] not in _CHECKED:
            continue
        family = next((f for f in EXPERT_FAMILIES if found["piece"] in f), None)
        if family is None:
            continue
        experts, pieces = layers.setdefault((found["layer"], found["kind"]), (set(), set()))
        experts.add(int(found["expert"]))
        pieces.update(family)
    for (layer, kind), (experts, pieces) in sorted(layers.items()):
        total = max(count, max(experts) + 1)
        absent = [
            f"{layer}.{e}.{p}.{kind}"
            for e in range(total)
            for p in sorted(pieces)
            if f"{layer}.{e}.{p}.{kind}" not in names
        ]
        if absent:
            yield layer, absent


def missing_pieces(
    names: Iterable[str],
    packed: Mapping[str, Sequence[str]] | None = None,
    config: Mapping | None = None,
) -> list[tuple[str, list[str]]]:
    """(merged weight, the checkpoint tensors it misses) for every merged weight of which a
    checkpoint with tensors `names` holds only some pieces.

    Args:
        names: the checkpoint's tensor names.
        packed: the model's ``packed_modules_mapping`` (merged parameter -> checkpoint
            pieces); None: `DEFAULT_PACKED`.
        config: the model's ``config.json`` (its expert count).
    """
    found = set(names)
    groups = list(_groups(found, DEFAULT_PACKED if packed is None else packed))
    return groups + list(_experts(found, config or {}))


def check_pieces(
    names: Iterable[str],
    packed: Mapping[str, Sequence[str]] | None,
    config: Mapping | None,
    *,
    source: str,
) -> None:
    """Refuse a checkpoint missing part of a merged weight (`missing_pieces`).

    Raises:
        ModelMismatchError: one line naming `source`, the first missing checkpoint tensor,
            the merged weight it belongs to and how many tensors are missing in all.
    """
    missing = missing_pieces(names, packed, config)
    if not missing:
        return
    merged, absent = missing[0]
    total = sum(len(a) for _, a in missing)
    more = f" ({total} checkpoint tensors missing in all)" if total > 1 else ""
    raise ModelMismatchError(
        f"{source}: checkpoint tensor {absent[0]} is missing{more}; vLLM merges it into "
        f"{merged}, which would keep uninitialised values there"
    )
