"""How the converter lays tensors out, and which bytes each rank needs, without vLLM.

Tensor parallelism splits a linear layer's weight (``[out, in]``, row-major) either by
output rows (column-parallel layers: q/k/v, gate/up, embeddings, lm_head), whose share is
one contiguous byte range, or by input columns (row-parallel layers: the attention output
and the MLP down projection), whose share in row-major order would be one short piece per
row. The converter stores the weight of each row-parallel layer in column tiles: ``[out,
in]`` becomes ``[T, out, in / T]`` (T = 8, or the largest of 4 and 2 that divides ``in``),
tile ``j`` holding columns ``[j * in / T, (j + 1) * in / T)``. A rank's share at any TP
that divides T is then whole tiles, one contiguous byte range; and filling a parameter from
a tile is a copy of whole rows of ``in / T`` elements, as fast as a plain copy, where a
transposed layout would need a transpose (3.5 GB/s on one core here, against 19 for the
tile copy). The file records each tiled tensor and its T (`FileRecord.column_tiles`), and
every loader puts the columns back.

`rank_reads` is the plan of one rank from names and shapes alone, following vLLM's
sharding rules for Llama/Mistral/Qwen/OPT-style names (vLLM 0.32): it is what the benchmark
reports for layouts no engine here can start (TP=4, TP=8). The engine itself does not use
these rules: the loader derives each rank's ranges from vLLM's own weight loaders (see
`regions`), so a name these rules do not know costs bytes, never correctness.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..format.record import name_pattern

__all__ = [
    "ROW_PARALLEL",
    "COLUMN_PARALLEL",
    "VOCAB_PADDING",
    "TILES",
    "column_tiles",
    "recorded_tiles",
    "TensorShape",
    "stored_shapes",
    "Read",
    "rank_reads",
    "local_experts",
    "expert_index",
    "split_dim",
]

# Weight names (last two components: "<layer>.weight") split along their input dimension.
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "fc2", "dense_4h_to_h", "w2", "wo")
# Split along their output dimension (weights and biases).
COLUMN_PARALLEL = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "fc1",
    "query_key_value",
    "dense_h_to_4h",
    "w1",
    "w3",
    "wq",
    "wk",
    "wv",
    "embed_tokens",
    "lm_head",
    "wte",
    "word_embeddings",
)
# vLLM pads vocabulary dimensions to a multiple of this before splitting them.
VOCAB_PADDING = 64
_VOCAB = ("embed_tokens", "lm_head", "wte", "word_embeddings")
_KV = ("k_proj", "v_proj", "wk", "wv")
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _layer(name: str) -> tuple[str, str]:
    """(layer name, parameter name) of a weight: ``...self_attn.o_proj.weight`` gives
    ``("o_proj", "weight")``."""
    parts = name.split(".")
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


TILES = (8, 4, 2)  # column tiles of a row-parallel weight: the first that divides `in`


def column_tiles(name: str, shape: Sequence[int]) -> int:
    """How many column tiles the converter stores this tensor in: for the 2-D weight
    ``[out, in]`` of a row-parallel layer, the first of `TILES` that divides ``in``; 0
    (stored as in the checkpoint) for every other tensor."""
    layer, param = _layer(name)
    if len(shape) != 2 or param != "weight" or layer not in ROW_PARALLEL:
        return 0
    return next((t for t in TILES if shape[1] % t == 0), 0)


def recorded_tiles(tiles: dict[str, int], names: Iterable[str]) -> dict[str, int]:
    """`tiles` (name -> column tiles of the tiled tensors among `names`) as the record
    keeps it (`format.record.TileMap`): one `name_pattern` for the names that share it when
    they all have the same tiles and no untiled tensor has it, the other names as they are.
    A Qwen3-MoE checkpoint of 48 layers x 128 experts has 6,192 tiled weights and 2
    patterns."""
    by_pattern: dict[str, set[int]] = {}
    for name in names:
        by_pattern.setdefault(name_pattern(name), set()).add(tiles.get(name, 0))
    kept: dict[str, int] = {}
    for name, count in tiles.items():
        pattern = name_pattern(name)
        if pattern != name and by_pattern.get(pattern) == {count}:
            kept[pattern] = count
        else:
            kept[name] = count
    return kept


@dataclass(frozen=True)
class TensorShape:
    """One tensor of a converted file: its name, logical shape (as in the checkpoint),
    element size in bytes, and its column tiles (0: stored as in the checkpoint)."""

    name: str
    shape: tuple[int, ...]
    itemsize: int
    tiles: int = 0

    @property
    def bytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def logical_shape(stored: Sequence[int], tiles: int) -> tuple[int, ...]:
    """The checkpoint shape of a tensor stored with `tiles` column tiles (``[T, out, w]``
    -> ``[out, T * w]``), or as stored."""
    if not tiles:
        return tuple(stored)
    count, out, width = stored
    return (out, count * width)


def stored_shapes(entries: Iterable, tiles: dict[str, int]) -> list[TensorShape]:
    """`TensorShape` of each of a converted file's tensors, from tensorizer's entries
    (``name``, ``shape``, ``bytes``) and the record's `tiles` (`FileRecord.column_tiles`)."""
    shapes = []
    for e in entries:
        shape = logical_shape(e.shape, tiles.get(e.name, 0))
        itemsize = e.bytes // max(1, math.prod(shape))
        shapes.append(TensorShape(e.name, shape, itemsize, tiles.get(e.name, 0)))
    return shapes


@dataclass(frozen=True)
class Read:
    """The byte range [start, stop) of one tensor's stored data that a rank reads, and the
    element range of the split dimension it covers (None: the whole tensor)."""

    name: str
    start: int
    stop: int
    elements: tuple[int, int] | None = None


def split_dim(name: str, shape: Sequence[int]) -> int | None:
    """The logical dimension vLLM splits across TP ranks (None: replicated)."""
    layer, param = _layer(name)
    if layer in ROW_PARALLEL and param == "weight" and len(shape) == 2:
        return 1
    if layer in COLUMN_PARALLEL and param in ("weight", "bias"):
        return 0
    return None


def _share(name: str, size: int, tp_size: int, tp_rank: int, config: dict) -> tuple[int, int]:
    """[start, stop) of the split dimension (of logical length `size`) on this rank."""
    layer, _ = _layer(name)
    if layer in _VOCAB:
        padded = -(-size // VOCAB_PADDING) * VOCAB_PADDING
        per = -(-padded // tp_size)
        return min(size, tp_rank * per), min(size, (tp_rank + 1) * per)
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    if layer in _KV and kv_heads < tp_size:  # each KV head replicated on several ranks
        head_dim = size // kv_heads
        head = tp_rank // (tp_size // kv_heads)
        return head * head_dim, (head + 1) * head_dim
    per = size // tp_size
    return tp_rank * per, (tp_rank + 1) * per


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The expert a checkpoint tensor belongs to (``...mlp.experts.17.down_proj.weight``:
    17), None for every other tensor (shared experts and the router included)."""
    found = _EXPERT.search(name)
    return int(found.group(1)) if found else None


def local_experts(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """The experts expert-parallel rank `ep_rank` of `ep_size` holds: vLLM's linear
    placement (0.32-0.34 ``determine_expert_map``, its default), a contiguous range; the
    first ``num_experts % ep_size`` ranks hold one more."""
    base, extra = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, extra)
    return range(start, start + base + (1 if ep_rank < extra else 0))


def rank_reads(
    tensors: Iterable[TensorShape],
    config: dict,
    tp_size: int,
    tp_rank: int,
    *,
    expert_parallel: bool = False,
) -> list[Read]:
    """The byte ranges TP rank `tp_rank` of `tp_size` reads of a converted file (PP=1).

    Args:
        tensors: the file's tensors, as `TensorShape`.
        config: the model's ``config.json`` (head counts, expert count).
        expert_parallel: vLLM's ``enable_expert_parallel`` (DP=1: the expert-parallel
            size is `tp_size`): a rank holds whole experts, its `local_experts`, and reads
            nothing of the others'; without it every rank reads its TP share of every
            expert.

    Returns:
        One `Read` per tensor it reads: a split tensor's share along its split dimension
        (one contiguous range, as the converter lays them out: rows, or the column tiles
        that hold the share's columns), a replicated one whole.
    """
    reads = []
    mine = None
    if expert_parallel:
        count = next((int(config[k]) for k in _EXPERT_COUNTS if config.get(k)), 0)
        mine = local_experts(count, tp_size, tp_rank)
    for t in tensors:
        expert = expert_index(t.name) if mine is not None else None
        if mine is not None and expert is not None:
            if expert in mine:  # whole experts: no TP split inside them
                reads.append(Read(t.name, 0, t.bytes))
            continue
        dim = split_dim(t.name, t.shape) if tp_size > 1 else None
        if dim is None or (dim == 1 and not t.tiles):
            reads.append(Read(t.name, 0, t.bytes))
            continue
        start, stop = _share(t.name, t.shape[dim], tp_size, tp_rank, config)
        if dim == 1:  # whole column tiles
            width, tile = t.shape[1] // t.tiles, t.bytes // t.tiles
            first, last = start // width, -(-stop // width)
            reads.append(Read(t.name, first * tile, last * tile, (start, stop)))
            continue
        row = t.bytes // t.shape[0]
        reads.append(Read(t.name, start * row, stop * row, (start, stop)))
    return reads
