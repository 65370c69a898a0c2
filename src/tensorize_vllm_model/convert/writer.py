"""``convert``: write a Hugging Face checkpoint as one tensorizer file that loads at any
tensor/pipeline-parallel layout, without vLLM, a GPU or an engine.

The result is laid out exactly as ``serialize`` lays out a one-rank model
(``DIR/vllm/<model ref>/<suffix>/model.tensors`` beside the config, tokenizer and
generation files), written all-or-nothing through the same staged writes. The tensors keep
the checkpoint's names; the weights of row-parallel layers are stored in column tiles
(`placement`), and the file record says so, marks the file as checkpoint form, and names
its dtype. vLLM's marker tensor is left out, so no loader takes the file for one rank's
vLLM parameters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .. import __version__, storage
from ..artifacts.model_files import (
    artifact_files,
    check_model_ref,
    resolve_model_files,
    stage_artifacts,
)
from ..config import TensorizerConfig
from ..config.plan import resolve_write
from ..core.errors import ConfigError
from ..core.progress import progress
from ..core.redaction import scrubbing
from ..format import writer as tensors_writer
from ..format.keys import EncryptionKey, prepare_key
from ..format.names import serialized_dir
from ..format.record import CHECKPOINT_FORM, FileRecord, ParallelLayout
from ..format.writer import (
    SerializeResult,
    StagedTensors,
    check_serialization_kwargs,
    write_tensors,
)
from .checkpoint import Checkpoint, hub_weight_files, open_checkpoint
from .placement import column_tiles, recorded_tiles

__all__ = ["DTYPES", "convert_checkpoint"]

logger = scrubbing("tensorize_vllm_model")

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_ALIASES = {"half": "float16", "float": "float32"}


def _target_dtype(dtype: str, checkpoint: Checkpoint) -> torch.dtype | None:
    """The dtype floating-point tensors are written in; None keeps each tensor's own.

    Raises:
        ConfigError: `dtype` is not one of `DTYPES`; a cast of a quantized checkpoint
            (its ``quantization_config``: scales and 8-bit weights must keep their dtypes);
            8-bit float weights in a checkpoint without a ``quantization_config`` (vLLM
            would copy the raw values into unquantized parameters), naming the tensor.
    """
    if dtype not in DTYPES:
        raise ConfigError(
            f"--dtype {dtype!r} is not supported by convert; choose one of {', '.join(DTYPES)}"
        )
    quantized = bool(checkpoint.config.get("quantization_config"))
    if quantized and dtype != "auto":
        raise ConfigError(
            f"--dtype {dtype}: {checkpoint.directory} is a quantized checkpoint (config.json "
            "has a quantization_config); convert it with --dtype auto, which keeps every "
            "tensor's dtype"
        )
    if not quantized:
        for name, found, _ in checkpoint.dtypes():
            if found.is_floating_point and found.itemsize == 1:
                raise ConfigError(
                    f"{checkpoint.directory}: tensor {name} is {str(found).removeprefix('torch.')}"
                    " but config.json has no quantization_config: vLLM would load its raw "
                    "values without their scales; add the quantization_config the checkpoint "
                    "was made with"
                )
    if dtype == "auto":
        return None
    return getattr(torch, _ALIASES.get(dtype, dtype))


def _recorded_dtype(target: torch.dtype | None, checkpoint: Checkpoint) -> str | None:
    """The dtype the record names: `target`, else the floating-point dtype(s) the tensors
    hold, from the headers (several joined by ``+``, the most bytes first); None when no
    tensor is floating-point."""
    if target is not None:
        return str(target).removeprefix("torch.")
    held: dict[str, int] = {}
    for _, dtype, numel in checkpoint.dtypes():
        if dtype.is_floating_point:
            name = str(dtype).removeprefix("torch.")
            held[name] = held.get(name, 0) + numel * dtype.itemsize
    return "+".join(sorted(held, key=lambda n: -held[n])) or None


def _stream(
    checkpoint: Checkpoint, target: torch.dtype | None, tiled: dict[str, int]
) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """The tensors to write, cast and laid out; `tiled` collects the column tiles of those
    stored in tiles (``[out, in]`` -> ``[T, out, in / T]``)."""
    for name, tensor in checkpoint.tensors():
        if target is not None and tensor.is_floating_point() and tensor.dtype != target:
            tensor = tensor.to(target)
        tiles = column_tiles(name, tensor.shape)
        if tiles:
            out, inputs = tensor.shape
            tensor = tensor.reshape(out, tiles, inputs // tiles).permute(1, 0, 2)
            tiled[name] = tiles
        yield name, tensor.contiguous(), False


def convert_checkpoint(
    model: str,
    serialized_directory: str,
    *,
    suffix: str,
    dtype: str = "auto",
    revision: str | None = None,
    keyfile: str | None = None,
    serialization_kwargs: Mapping[str, Any] | None = None,
    config: TensorizerConfig | None = None,
    download_dir: str | None = None,
) -> SerializeResult:
    """Convert checkpoint `model` into ``<serialized_directory>/vllm/<model ref>/<suffix>/``.

    Args:
        model: a local checkpoint directory (safetensors or ``.bin``), or a Hugging Face
            Hub id where a Hub is reachable.
        serialized_directory: a local directory or ``s3://bucket[/prefix]``.
        suffix: the last directory of the destination.
        dtype: ``auto`` (keep the checkpoint's) or the dtype to cast floating-point
            tensors to (``float16``, ``bfloat16``, ``float32``).
        revision: the Hub revision, for a Hub id.
        keyfile: encrypt as ``serialize --keyfile`` does (`keys.prepare_key`): with the
            32-byte key already in this file (left unchanged), else with a new random key
            saved here (mode 0600) together with the model.
        serialization_kwargs: extra arguments for tensorizer's ``TensorSerializer``.
        config: S3 credentials and transport settings for an ``s3://`` destination.

    Returns: a `SerializeResult` (`bytes`: the tensor bytes; `left_out`: files not carried).

    Raises:
        StorageError: the checkpoint is missing, incomplete (a shard named) or the
            destination cannot be written.
        ConfigError: an unsupported dtype or unknown serialization keyword.
        EncryptionError: `keyfile` exists but is not a 32-byte key (nothing written).
    """
    start = time.perf_counter()
    options = config.options if config is not None else None
    local, checkpoint, target = _source(model, dtype, revision, download_dir)
    check_serialization_kwargs(serialization_kwargs or {})
    directory = serialized_dir(serialized_directory, model, suffix)
    # serialize's key rules: an existing key file is used as it is, a missing one gets a
    # new key published with the model, anything else is refused before a byte is written.
    key_config = config or TensorizerConfig(tensorizer_uri=directory)
    encryption = prepare_key(keyfile, key_config) if keyfile else None
    with storage.transaction(options) as tx:
        tensors = _stage_all(
            tx, local, checkpoint, directory, target, encryption, serialization_kwargs
        )
    return SerializeResult(
        directory=directory,
        tensors_uri=tensors.uri,
        files=tx.uris,
        tensors=tensors.tensors,
        bytes=tensors.bytes,
        seconds=time.perf_counter() - start,
        keyfile=keyfile,
        key_existing=bool(encryption and encryption.existing),
        left_out=[str(item) for item in artifact_files(local)[1]],
    )


def _source(
    model: str, dtype: str, revision: str | None, download_dir: str | None
) -> tuple[str, Checkpoint, torch.dtype | None]:
    """(the checkpoint's local directory, the checkpoint, the dtype to write in)."""
    local = model
    check_model_ref(model)
    if not os.path.isdir(model):  # a Hub id: its config, tokenizer and the weights read
        files = hub_weight_files(model, revision, download_dir)
        local = resolve_model_files(
            model, revision=revision, download_dir=download_dir, weights=files or True
        )
    checkpoint = open_checkpoint(local)
    return local, checkpoint, _target_dtype(dtype, checkpoint)


def _stage_all(
    tx: storage.Transaction,
    local: str,
    checkpoint: Checkpoint,
    directory: str,
    target: torch.dtype | None,
    encryption: EncryptionKey | None,
    serialization_kwargs: Mapping[str, Any] | None,
) -> StagedTensors:
    """Stage everything convert publishes into `directory`, in `tx`: the artifacts, a new
    key, the tensors last (a tensors file that exists is complete). A rollback also removes
    the directories made for them."""
    created = _missing_dirs(directory)
    tx.on_rollback(lambda: _remove_empty(created))
    storage.check_writable(directory, tx.options)
    key = encryption.key if encryption else None
    tensors = _write_checkpoint(tx, checkpoint, directory, target, key, serialization_kwargs)
    stage_artifacts(tx, [local], directory)
    if encryption is not None:
        encryption.stage(tx)
    return tensors


def _write_checkpoint(
    tx: storage.Transaction,
    checkpoint: Checkpoint,
    directory: str,
    target: torch.dtype | None,
    key: bytes | None,
    serialization_kwargs: Mapping[str, Any] | None,
) -> StagedTensors:
    """Write the checkpoint's tensors (cast, row-parallel weights in column tiles) to
    ``directory/model.tensors``, staged in `tx`, with the record saying what was done."""
    tiled: dict[str, int] = {}
    planned = _tiled(checkpoint)
    record = FileRecord(
        architecture=checkpoint.architecture,
        dtype=_recorded_dtype(target, checkpoint),
        producer=f"tensorize_vllm_model {__version__} (convert)",
        extra={
            "form": CHECKPOINT_FORM,
            "column_tiles": recorded_tiles(planned, (name for name, _ in checkpoint.shapes())),
            "source_format": checkpoint.kind,
        },
    )
    with progress("Converting", checkpoint.tensor_bytes(target), logger=logger) as advance:
        tensors = write_tensors(
            resolve_write(TensorizerConfig(tensorizer_dir=directory), ParallelLayout()).uri,
            _stream(checkpoint, target, tiled),
            record=record,
            key=key,
            serialization_kwargs=serialization_kwargs,
            marker=False,
            on_bytes=advance,
            batch_bytes=tensors_writer.BATCH_BYTES,
            tx=tx,
            index=_index(checkpoint, target, planned),
        )
    if tiled != planned:  # the record must say what was done
        raise RuntimeError("the tiled tensors differ from the planned ones")
    return tensors


def _index(
    checkpoint: Checkpoint, target: torch.dtype | None, tiled: dict[str, int]
) -> list[tensors_writer.IndexEntry]:
    """(name, dtype, dimensions) of every tensor `_stream` writes, from the headers: sizes
    tensorizer's index before the first tensor is written (any tensor count)."""
    dims = {name: len(shape) + (1 if name in tiled else 0) for name, shape in checkpoint.shapes()}
    index = []
    for name, dtype, _ in checkpoint.dtypes():
        if target is not None and dtype.is_floating_point:
            dtype = target
        index.append((name, dtype, dims[name]))
    return index


def _missing_dirs(directory: str) -> list[str]:
    """The local directories up to `directory` that do not exist yet, deepest first (those
    a failed convert removes again, if empty); none for S3, which has no directories."""
    local = storage.local_path(directory)
    if local is None:
        return []
    missing, path = [], os.path.abspath(local)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_empty(directories: list[str]) -> None:
    """Remove `directories` (deepest first) while they are empty."""
    for path in directories:
        try:
            os.rmdir(path)
        except OSError:
            return


def _tiled(checkpoint: Checkpoint) -> dict[str, int]:
    """The column tiles `_stream` will write, known before any tensor is written (the
    record comes first in the file)."""
    planned = {name: column_tiles(name, shape) for name, shape in checkpoint.shapes()}
    return {name: tiles for name, tiles in planned.items() if tiles}
