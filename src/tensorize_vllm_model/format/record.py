"""The file record: what every tensors file this package writes says of itself.

Every file this package writes starts with vLLM's marker tensor, ``.vllm_tensorized_marker``
(`MARKER_NAME`, a PARAM of the root module, as vLLM's own serializer writes it), whose bytes
are JSON (`FileRecord`, uint8): the producer, the architecture, the dtype and the parallel
layout (`ParallelLayout`), so a load can check that a file fits before using it. vLLM's
built-in loader (0.32, `deserialize_tensorizer_model`) only looks for the marker's name,
loads it into the model with tensorizer's ``load_into_module`` and deletes it, so it ignores
the record and loads these files too. Files without the marker (checkpoint-form files of
``convert``, which vLLM must not take for its own parameters) and files written by earlier
versions of this package keep the record in its own STATE_DICT tensor,
``.tensorize_vllm_model_record`` (`RECORD_NAME`); this package reads both forms, but
tensorizer's ``load_into_module`` (hence vLLM's built-in loader) refuses STATE_DICT entries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import FormatError, LayoutError, setting_hint

__all__ = [
    "RECORD_NAME",
    "MARKER_NAME",
    "RESERVED_NAMES",
    "RECORD_FORMAT",
    "CHECKPOINT_FORM",
    "RECORD_VERSION",
    "FileRecord",
    "TileMap",
    "MAX_RECORD_BYTES",
    "name_pattern",
    "ParallelLayout",
]

# The record's own STATE_DICT tensor: files without the marker, and of earlier versions.
RECORD_NAME = ".tensorize_vllm_model_record"
MARKER_NAME = ".vllm_tensorized_marker"
RESERVED_NAMES = frozenset({RECORD_NAME, MARKER_NAME})
RECORD_FORMAT = "tensorize_vllm_model"
# FileRecord.extra["form"] of a file written by `convert`: the checkpoint's own tensors.
CHECKPOINT_FORM = "checkpoint"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class ParallelLayout:
    """A tensor/pipeline-parallel layout and one rank in it."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def rank(self) -> int:
        """The global rank: vLLM numbers TP ranks fastest."""
        return self.pp_rank * self.tensor_parallel_size + self.tp_rank

    def describe(self) -> str:
        return f"TP={self.tensor_parallel_size} x PP={self.pipeline_parallel_size}"


def name_pattern(name: str) -> str:
    """`name` with each number between dots (a layer's, an expert's) replaced by ``*``:
    ``model.layers.3.mlp.experts.17.down_proj.weight`` ->
    ``model.layers.*.mlp.experts.*.down_proj.weight``."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit():
            parts[i] = "*"
    return ".".join(parts)


class TileMap(Mapping[str, int]):
    """A converted file's column tiles by tensor name, recorded by name or by
    `name_pattern` (one entry for a weight of every layer and expert: the record stays
    small at any tensor count); a name's own entry comes first."""

    def __init__(self, recorded: dict[str, int]):
        self._recorded = recorded
        self._patterns = any("*" in name for name in recorded)
        self._seen: dict[str, int] = {}  # names resolved through a pattern (0: none)

    def __getitem__(self, name: str) -> int:
        found = self._recorded.get(name)
        if found is None and self._patterns:  # a load asks for each name several times
            found = self._seen.get(name)
            if found is None:
                found = self._seen[name] = self._recorded.get(name_pattern(name), 0)
        if not found:
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._recorded)

    def __len__(self) -> int:
        return len(self._recorded)


@dataclass
class FileRecord:
    """What a tensors file written by this package records about itself."""

    architecture: str | None = None
    dtype: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    rank: int = 0
    encrypted: bool = False
    producer: str = ""
    format: str = RECORD_FORMAT
    version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_checkpoint_form(self) -> bool:
        """Whether the file holds a Hugging Face checkpoint's tensors (written by
        ``convert``, loadable at any layout) rather than one rank's vLLM parameters."""
        return self.extra.get("form") == CHECKPOINT_FORM

    @property
    def column_tiles(self) -> TileMap:
        """Name -> column tiles of each tensor a converted file stores in column tiles
        (see `convert.placement`); the record may name them by `name_pattern`."""
        return TileMap({str(k): int(v) for k, v in (self.extra.get("column_tiles") or {}).items()})

    @property
    def transposed(self) -> frozenset[str]:
        """Names of the tensors a file converted by tensorize_vllm_model 0.1 before column
        tiles stores transposed: such a file is refused at load (convert it again)."""
        return frozenset(self.extra.get("transposed") or ())

    @property
    def layout_text(self) -> str:
        return f"TP={self.tensor_parallel_size} x PP={self.pipeline_parallel_size}"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> FileRecord:
        if len(data) > MAX_RECORD_BYTES:
            raise FormatError(f"{source}: the file record is {len(data)} bytes, too large")
        try:
            raw = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{source}: the file record is not valid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
            raise FormatError(f"{source}: the file record is not a {RECORD_FORMAT} record")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def check_expert_parallel(self, enabled: bool, names: Iterable[str], *, source: str) -> None:
        """Raise LayoutError when a rank file of a mixture-of-experts model (tensors named
        ``...experts...``) was serialized with vLLM's expert parallelism
        (``enable_expert_parallel``: each rank holds whole experts, a share of them) and is
        loaded without it, or the other way round (each rank holds every expert's TP
        share): the parameters' shapes differ. Recorded as ``extra["expert_parallel"]``."""
        saved = bool(self.extra.get("expert_parallel"))
        if saved == enabled or not any(".experts." in name for name in names):
            return
        flag = "with" if saved else "without"
        raise LayoutError(
            f"{source} was serialized {flag} expert parallelism but is being loaded "
            f"{'without' if saved else 'with'} it; load it {flag} --enable-expert-parallel, "
            "or serialize the model again for this layout"
        )

    def check_written_for(self, layout: ParallelLayout, *, source: str) -> None:
        """Raise LayoutError when this file was written for another layout or rank."""
        if (self.tensor_parallel_size, self.pipeline_parallel_size) != (
            layout.tensor_parallel_size,
            layout.pipeline_parallel_size,
        ):
            raise LayoutError(
                f"{source} was serialized for {self.layout_text} but is being loaded with "
                f"{layout.describe()}; load it with "
                f"{setting_hint('tensor_parallel_size', self.tensor_parallel_size)} "
                f"{setting_hint('pipeline_parallel_size', self.pipeline_parallel_size)}, or "
                "serialize the model again for this layout"
            )
        if self.rank != layout.rank:
            raise LayoutError(
                f"{source} holds the shard of rank {self.rank}, but rank {layout.rank} is "
                "loading it; check the rank template in tensorizer_uri"
            )
