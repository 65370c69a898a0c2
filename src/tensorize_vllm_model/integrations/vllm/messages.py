"""The names vLLM is given (load formats, the worker extension's class path) and the typed
requests and answers of the worker extension's ``collective_rpc`` calls.

vLLM 0.32 carries ``collective_rpc`` arguments and answers between the ``LLM`` process and
the engine core with msgpack (``vllm.v1.serial_utils``), which takes plain data only (a
dataclass arrives as a dict; pickle needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``). So each
message crosses as the dict of `encode` (its fields and its type's name) and is a typed
dataclass again on the other side (`decode`): `engine.Engine` and `worker.worker_call` do
both, so neither side handles dicts with string keys. `WorkerFailure` carries one of this
package's errors back. A worker's load figures cross as `read.base.LoadStats` (its
`ReadTimes` nested as a dict on the wire, so a user's own ``llm.collective_rpc(
"tensorize_vllm_model_load_stats")`` still gets ``stats["bytes"]``,
``stats["read_times"]["reading"]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ...read.base import LoadStats, ReadTimes

__all__ = [
    "LOAD_FORMAT",
    "CAPTURE_LOAD_FORMAT",
    "WORKER_EXTENSION",
    "SaveRequest",
    "SavedFile",
    "LoraModules",
    "WorkerFailure",
    "LoadStats",
    "encode",
    "decode",
]

# The load format this package serves (it replaces vLLM's own tensorizer loader).
LOAD_FORMAT = "tensorizer"
# The load format of a serialize's engine: vLLM's default loader that keeps the weights.
CAPTURE_LOAD_FORMAT = "tensorize_vllm_model_capture"
# The class vLLM mixes into its workers (``worker_extension_cls``), as vLLM takes it: a
# dotted path (vLLM imports it in each worker).
WORKER_EXTENSION = "tensorize_vllm_model.integrations.vllm.worker.WorkerExtension"


@dataclass(frozen=True)
class SaveRequest:
    """Write the captured weights of every rank.

    Attributes:
        rank_uris: each rank's tensors file, in global rank order (`plan.WritePlan.rank_uris`:
            the workers write where the plan says, they choose no file).
        key: the 32-byte key to encrypt with, or None.
        serialization_kwargs: extra keyword arguments for tensorizer's ``TensorSerializer``.
        stream_options: how to reach remote storage: the plain form of the write plan's
            options (`StreamOptions.as_mapping`; vLLM's RPC carries plain data only).
        producer: the record's producer text (package and vLLM versions).
    """

    rank_uris: list[str]
    key: bytes | None = field(default=None, repr=False)
    serialization_kwargs: dict[str, Any] = field(default_factory=dict)
    stream_options: dict[str, Any] = field(default_factory=dict, repr=False)
    producer: str = ""


@dataclass(frozen=True)
class SavedFile:
    """What one rank staged: its global rank, its file, how many tensors and bytes, and
    its compile-cache archive (`compile_cache`), if one was kept."""

    rank: int
    uri: str
    tensors: int
    bytes: int
    compile_cache: str | None = None


@dataclass(frozen=True)
class LoraModules:
    """The module names a LoRA adapter may target in the loaded model (PEFT's names,
    packed modules unpacked), and the engine's ``--max-lora-rank`` when LoRA is enabled."""

    modules: list[str]
    max_rank: int | None


@dataclass(frozen=True)
class WorkerFailure:
    """One of this package's errors, raised in a worker: its message and class name."""

    message: str
    kind: str


# The key of an encoded message that names its type.
MESSAGE_KEY = "tensorize_vllm_model_message"
_TYPES = {
    cls.__name__: cls for cls in (SaveRequest, SavedFile, LoraModules, WorkerFailure, LoadStats)
}
# Fields holding a dataclass of their own (``dataclasses.asdict`` makes them dicts too).
_NESTED: dict[str, dict[str, type]] = {"LoadStats": {"read_times": ReadTimes}}


def encode(message: Any) -> Any:
    """A message as plain data (a dict of its fields and its type's name); anything else as
    it is."""
    if type(message) in _TYPES.values():
        return {**dataclasses.asdict(message), MESSAGE_KEY: type(message).__name__}
    return message


def decode(value: Any) -> Any:
    """An encoded message as its dataclass again (a message already typed, as an in-process
    engine passes it, as it is); anything else as it is."""
    if isinstance(value, dict) and value.get(MESSAGE_KEY) in _TYPES:
        kind = value[MESSAGE_KEY]
        fields = {k: v for k, v in value.items() if k != MESSAGE_KEY}
        for name, nested in _NESTED.get(kind, {}).items():
            if isinstance(fields.get(name), dict):
                fields[name] = nested(**fields[name])
        return _TYPES[kind](**fields)
    return value
