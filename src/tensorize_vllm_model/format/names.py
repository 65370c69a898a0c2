"""Names: where a serialized model's files go, and rank templates.

* The serialized directory: ``<serialized-directory>/vllm/<model ref>/<suffix>/`` holding
  ``model.tensors`` (one rank) or ``model-rank-000.tensors``, ``model-rank-001.tensors``...
  (one file per rank, numbered by the global rank ``pp_rank * tp_size + tp_rank``), beside
  the model's config, tokenizer and generation files.
* A rank template is a printf-style integer field in a URI (``%d``, ``%03d``): where each
  rank's number goes. `RANK_TEMPLATE` is the one pattern that recognises it.
"""

from __future__ import annotations

import os
import re

from .. import storage
from ..core.errors import ConfigError
from .record import ParallelLayout

__all__ = [
    "DEFAULT_TENSORS_NAME",
    "SHARDED_TENSORS_NAME",
    "RANK_TEMPLATE",
    "has_rank_template",
    "model_ref_path",
    "serialized_dir",
    "tensors_uri",
    "rank_uri",
    "needs_rank_files",
]

DEFAULT_TENSORS_NAME = "model.tensors"
SHARDED_TENSORS_NAME = "model-rank-%03d.tensors"

# A printf-style integer template, %d or zero-padded (%03d, %05d): where the rank goes.
# Not %<1-9>...d: that is a URL's percent-encoding followed by a "d" ("my%20dogs"). vLLM
# 0.32 recognises %0<digit>d only.
RANK_TEMPLATE = re.compile(r"%(?:0\d*)?d")


def has_rank_template(uri: str | None) -> bool:
    """Whether `uri` holds a rank template such as ``%03d``."""
    return bool(uri and RANK_TEMPLATE.search(uri))


def model_ref_path(model: str) -> str:
    """The ``<model ref>`` part of the serialized directory for ``--model``.

    A Hub id or relative path (``org/name``) is kept as it is, as in vLLM's example
    script. An absolute path, or a relative one that climbs with ``..``, becomes its last
    component (``/models/llama-3`` gives ``llama-3``), so files never land outside the
    serialized directory.

    Raises:
        ConfigError: no directory name can be derived from `model`.
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
        ConfigError: a suffix that is empty, holds a ``/`` or is ``.``/``..``; a ``%`` in
            any part (a load would read it as a rank template, or fail to format one).
    """
    if not suffix or "/" in suffix or "\\" in suffix or suffix in (".", ".."):
        raise ConfigError(f"--suffix must be a single directory name, got {suffix!r}")
    base = serialized_directory.rstrip("/") or "/"
    ref = model_ref_path(model)
    for flag, part in (("--serialized-directory", base), ("--model", ref), ("--suffix", suffix)):
        if "%" in part:
            raise ConfigError(
                f"{flag} gives the directory name {part!r}, which holds a '%': loading "
                "the serialized directory would read it as a rank template (model-rank-"
                "%03d.tensors); choose a name without '%'"
            )
    return storage.join(base, "vllm", ref, suffix)


def tensors_uri(directory: str, world_size: int) -> str:
    """The tensors file (or rank template) in a serialized directory."""
    name = SHARDED_TENSORS_NAME if world_size > 1 else DEFAULT_TENSORS_NAME
    return storage.join(directory, name)


def rank_uri(uri: str, layout: ParallelLayout, *, shared: bool = False) -> str:
    """The file of this rank: `uri` formatted with the global rank.

    Args:
        uri: a file, or a rank template such as ``model-rank-%03d.tensors``.
        layout: the parallel layout and this rank.
        shared: `uri` may be one file that every rank reads (a load: whether that file may
            be shared is `plan.check_shared_file`'s question). Writes never share.

    Raises:
        ConfigError: more than one rank, no rank template in `uri`, and not `shared`.
    """
    if not has_rank_template(uri):
        if layout.world_size > 1 and not shared:
            raise needs_rank_files(uri, layout)
        return uri
    try:
        return uri % layout.rank
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tensorizer_uri {uri!r} is not a valid rank template: {e}") from None


def needs_rank_files(uri: str, layout: ParallelLayout) -> ConfigError:
    """The error for a vLLM-tensorized `uri` without rank template at more than one rank."""
    return ConfigError(
        f"{layout.describe()} needs one vLLM-tensorized file per rank, but tensorizer_uri "
        f"{uri!r} has no rank template; use a name such as "
        f"'{storage.join(storage.parent(uri), SHARDED_TENSORS_NAME)}' (a file that is not "
        "vLLM-tensorized, such as a Hugging Face model written with write_module, loads at "
        "any layout from one URI)"
    )
