"""Names and records: where a serialized model's files go and what each file says of itself.

* The serialized directory: ``<serialized-directory>/vllm/<model ref>/<suffix>/`` holding
  ``model.tensors`` (one rank) or ``model-rank-000.tensors``, ``model-rank-001.tensors``...
  (one file per rank, numbered by the global rank ``pp_rank * tp_size + tp_rank``), beside
  the model's config, tokenizer and generation files.
* The file record: every file this package writes starts with vLLM's marker tensor,
  ``.vllm_tensorized_marker`` (a PARAM of the root module, as vLLM's own serializer writes
  it), whose bytes are JSON (`FileRecord`, uint8): the producer, the architecture, the dtype
  and the parallel layout, so a load can check that a file fits before using it. vLLM's
  built-in loader (0.32, `deserialize_tensorizer_model`) only looks for the marker's name,
  loads it into the model with tensorizer's ``load_into_module`` and deletes it, so it
  ignores the record and loads these files too. Files without the marker (checkpoint-form
  files of ``convert``, which vLLM must not take for its own parameters) and files written
  by earlier versions of this package keep the record in its own STATE_DICT tensor,
  ``.tensorize_vllm_model_record`` (`RECORD_NAME`); this package reads both forms, but
  tensorizer's ``load_into_module`` (hence vLLM's built-in loader) refuses STATE_DICT entries.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage
from .config import DEFAULT_TENSORS_NAME, SHARDED_TENSORS_NAME
from .errors import ConfigError, FormatError, LayoutError

__all__ = [
    "RECORD_NAME",
    "MARKER_NAME",
    "RESERVED_NAMES",
    "FileRecord",
    "ParallelLayout",
    "model_ref_path",
    "serialized_dir",
    "tensors_uri",
    "rank_uri",
    "check_shared_file",
]

# The record's own STATE_DICT tensor: files without the marker, and of earlier versions.
RECORD_NAME = ".tensorize_vllm_model_record"
MARKER_NAME = ".vllm_tensorized_marker"
RESERVED_NAMES = frozenset({RECORD_NAME, MARKER_NAME})
RECORD_FORMAT = "tensorize_vllm_model"
# FileRecord.extra["form"] of a file written by `convert`: the checkpoint's own tensors.
CHECKPOINT_FORM = "checkpoint"
RECORD_VERSION = 1
_MAX_RECORD_BYTES = 64 * 1024

_RANK_TEMPLATE = re.compile(r"%0?\d*d")


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
    def transposed(self) -> frozenset[str]:
        """Names of the tensors a converted file stores transposed (see
        `convert.placement`)."""
        return frozenset(self.extra.get("transposed") or ())

    @property
    def layout_text(self) -> str:
        return f"TP={self.tensor_parallel_size} x PP={self.pipeline_parallel_size}"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str) -> FileRecord:
        if len(data) > _MAX_RECORD_BYTES:
            raise FormatError(f"{source}: the file record is {len(data)} bytes, too large")
        try:
            raw = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{source}: the file record is not valid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
            raise FormatError(f"{source}: the file record is not a {RECORD_FORMAT} record")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def check_layout(self, layout: ParallelLayout, *, source: str) -> None:
        """Raise LayoutError when this file was written for another layout or rank."""
        if (self.tensor_parallel_size, self.pipeline_parallel_size) != (
            layout.tensor_parallel_size,
            layout.pipeline_parallel_size,
        ):
            raise LayoutError(
                f"{source} was serialized for {self.layout_text} but is being loaded with "
                f"{layout.describe()}; load it with --tensor-parallel-size "
                f"{self.tensor_parallel_size} --pipeline-parallel-size "
                f"{self.pipeline_parallel_size}, or serialize the model again for this layout"
            )
        if self.rank != layout.rank:
            raise LayoutError(
                f"{source} holds the shard of rank {self.rank}, but rank {layout.rank} is "
                "loading it; check the rank template in tensorizer_uri"
            )


def model_ref_path(model: str) -> str:
    """The ``<model ref>`` part of the serialized directory for ``--model``.

    A Hub id or relative path (``org/name``) is kept as it is, as in vLLM's example
    script. An absolute path, or a relative one that climbs with ``..``, becomes its last
    component (``/models/llama-3`` gives ``llama-3``), so files never land outside the
    serialized directory.
    """
    model = os.fspath(model)
    segments = [s for s in model.replace("\\", "/").split("/") if s not in ("", ".")]
    if os.path.isabs(model) or ".." in segments or "://" in model:
        name = os.path.basename(os.path.normpath(model.split("://", 1)[-1]))
        segments = [name] if name not in ("", ".", "..", "/") else []
    if not segments:
        raise ConfigError(f"cannot derive a directory name from --model {model!r}")
    return "/".join(segments)


def serialized_dir(serialized_directory: str, model: str, suffix: str) -> str:
    """``<serialized_directory>/vllm/<model ref>/<suffix>``.

    Raises:
        ConfigError: a suffix that is empty, holds a ``/`` or is ``.``/``..``.
    """
    if not suffix or "/" in suffix or "\\" in suffix or suffix in (".", ".."):
        raise ConfigError(f"--suffix must be a single directory name, got {suffix!r}")
    base = serialized_directory.rstrip("/") or "/"
    return storage.join(base, "vllm", model_ref_path(model), suffix)


def tensors_uri(directory: str, world_size: int) -> str:
    """The tensors file (or rank template) in a serialized directory."""
    name = SHARDED_TENSORS_NAME if world_size > 1 else DEFAULT_TENSORS_NAME
    return storage.join(directory, name)


def has_rank_template(uri: str) -> bool:
    return bool(_RANK_TEMPLATE.search(uri))


def rank_uri(uri: str, layout: ParallelLayout, *, shared: bool = False) -> str:
    """The file of this rank: `uri` formatted with the global rank.

    Args:
        uri: a file, or a rank template such as ``model-rank-%03d.tensors``.
        layout: the parallel layout and this rank.
        shared: `uri` may be one file that every rank reads (a load: whether that file may
            be shared is `check_shared_file`'s question). Writes never share.

    Raises:
        ConfigError: more than one rank, no rank template in `uri`, and not `shared`.
    """
    if not has_rank_template(uri):
        if layout.world_size > 1 and not shared:
            raise _needs_rank_files(uri, layout)
        return uri
    try:
        return uri % layout.rank
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tensorizer_uri {uri!r} is not a valid rank template: {e}") from None


def check_shared_file(
    uri: str, layout: ParallelLayout, *, vllm_tensorized: bool, record: FileRecord | None
) -> None:
    """Whether one file (a `uri` without rank template) can be loaded by every rank of
    `layout`.

    A file that is not vLLM-tensorized (a Hugging Face model written with tensorizer's
    ``write_module``) holds whole, unsharded weights: every rank reads it and vLLM's weight
    loaders take each rank's part, at any TP/PP (as vLLM's own tensorizer loader does). A
    vLLM-tensorized file holds the weights of one rank as vLLM shards them, so more than one
    rank needs one file per rank.

    Raises:
        LayoutError: the file records the layout it was written for, and it is another.
        ConfigError: a vLLM-tensorized file for more than one rank, without rank template.
    """
    if layout.world_size == 1 or has_rank_template(uri) or not vllm_tensorized:
        return
    if record is not None:
        record.check_layout(layout, source=uri)
    raise _needs_rank_files(uri, layout)


def _needs_rank_files(uri: str, layout: ParallelLayout) -> ConfigError:
    return ConfigError(
        f"{layout.describe()} needs one vLLM-tensorized file per rank, but tensorizer_uri "
        f"{uri!r} has no rank template; use a name such as "
        f"'{storage.join(storage.parent(uri), SHARDED_TENSORS_NAME)}' (a file that is not "
        "vLLM-tensorized, such as a Hugging Face model written with write_module, loads at "
        "any layout from one URI)"
    )
