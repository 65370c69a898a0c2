"""Checks made from a file's header and record alone, before any engine work: whether a file
holds a vLLM model's own parameters (`is_vllm_tensorized`) and whether every rank's file
fits the parallel layout (`check_shards`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import TensorizerConfig, as_tensorizer_config
from ..config.plan import check_shared_file, resolve_read
from ..format.names import has_rank_template
from ..format.record import ParallelLayout
from ..read.reader import open_tensors

__all__ = ["is_vllm_tensorized", "check_shards"]


def is_vllm_tensorized(tensorizer_config: TensorizerConfig | Mapping[str, Any]) -> bool:
    """Whether the file of `tensorizer_config` holds a vLLM model's parameters.

    True for files written by this package or by vLLM's own serializer (they carry a
    marker); False for a Hugging Face model written with ``write_module``. Only the header
    is read. For a rank template, the file of rank 0 is checked. `tensorizer_config` may be
    this package's `TensorizerConfig`, vLLM's, or a dict of its fields.
    """
    tensorizer_config = as_tensorizer_config(tensorizer_config)
    if tensorizer_config.vllm_tensorized:
        return True
    uri = resolve_read(tensorizer_config, ParallelLayout()).uri  # rank 0's file
    with open_tensors(uri, device="cpu", config=tensorizer_config) as reader:
        return reader.vllm_tensorized


def check_shards(
    config: TensorizerConfig | Mapping[str, Any],
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
) -> int:
    """Check every rank's file before any engine work: it opens, it is a tensorizer file, it
    decrypts with the key given, and it was written for this layout and rank.

    Only headers (and each file's small record) are read. A ``tensorizer_uri`` without rank
    template is one file every rank reads: allowed, at any layout, for a file that is not
    vLLM-tensorized (a Hugging Face model, a converted checkpoint; see
    `plan.check_shared_file`).

    Returns:
        The total tensor bytes of all ranks (of the one shared file).

    Raises:
        ConfigError: a vLLM-tensorized file, more than one rank and no rank template.
        StorageError: a shard is missing (named) or unreachable.
        LayoutError: a shard was written for another layout (both are named).
        EncryptionError, FormatError: as `open_tensors`.
    """
    config = as_tensorizer_config(config)
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    uri = config.tensorizer_uri
    assert uri is not None
    if not has_rank_template(uri):
        with open_tensors(uri, device="cpu", config=config) as reader:
            check_shared_file(
                uri,
                ParallelLayout(tp, pp),
                vllm_tensorized=reader.vllm_tensorized,
                record=reader.record,
            )
            if reader.record is not None and not reader.checkpoint_form:
                reader.record.check_written_for(ParallelLayout(tp, pp), source=reader.uri)
            return reader.total_tensor_bytes
    plan = resolve_read(config, ParallelLayout(tp, pp))
    total = 0
    for rank, rank_file in enumerate(plan.rank_uris()):
        with open_tensors(rank_file, device="cpu", config=config) as reader:
            if reader.record is not None:
                reader.record.check_written_for(plan.rank_layout(rank), source=reader.uri)
            total += reader.total_tensor_bytes
    return total
