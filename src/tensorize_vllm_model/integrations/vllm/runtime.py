"""Facts about the running vLLM worker (its layout, its device) and the state it keeps
between calls (`WorkerState`): one object per worker process instead of module globals."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from vllm.config import ModelConfig, VllmConfig

from ... import storage
from ...config import TensorizerConfig
from ...format.record import ParallelLayout
from ...read.base import LoadStats

if TYPE_CHECKING:
    from ...storage import Transaction

__all__ = [
    "CapturedWeights",
    "WorkerState",
    "STATE",
    "current_layout",
    "distributed_layout",
    "expert_parallel",
    "target_device",
    "torch_dtype_name",
    "model_dtype",
    "reload_config",
    "readers_on_every_core",
]


@dataclass
class CapturedWeights:
    """The weights `loader.CaptureLoader` kept before vLLM's post-processing.

    Attributes:
        tensors: (name, tensor, is_buffer) in the model's order.
        architecture: the model class name (vLLM's, e.g. ``LlamaForCausalLM``).
        dtype: the model's dtype name (``bfloat16``...).
    """

    tensors: list[tuple[str, torch.Tensor, bool]]
    architecture: str
    dtype: str


@dataclass
class WorkerState:
    """What one worker process keeps between ``collective_rpc`` calls.

    Attributes:
        captured: the weights to serialize (set by the capture loader, taken by a save).
        transaction: the transaction holding this worker's staged tensors files until the
            commit or abort call (`storage.transaction`, which rolls back at process exit
            if still open).
        last_load: the figures of the last load.
        last_parts: (tensor, first byte, end byte) of every range the last load of a
            converted file read.
    """

    captured: CapturedWeights | None = None
    transaction: Transaction | None = None
    last_load: LoadStats | None = None
    last_parts: list[tuple[str, int, int]] = field(default_factory=list)

    def open_transaction(self, options: Any) -> Transaction:
        """The open transaction of this worker's saves (a new one when there is none)."""
        if self.transaction is None or self.transaction.closed:
            self.transaction = storage.transaction(options)
        return self.transaction

    def take_transaction(self) -> Transaction | None:
        """The open transaction, handed over for its commit or rollback."""
        tx, self.transaction = self.transaction, None
        return tx


# The state of this worker process.
STATE = WorkerState()


def current_layout(vllm_config: VllmConfig) -> ParallelLayout:
    """This worker's place in the tensor/pipeline-parallel layout."""
    parallel = vllm_config.parallel_config
    tp_rank = pp_rank = 0
    if parallel.world_size > 1:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        tp_rank = get_tensor_model_parallel_rank()
        pp_rank = get_pp_group().rank_in_group
    return ParallelLayout(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
    )


def expert_parallel(vllm_config: VllmConfig) -> bool:
    """Whether this engine places whole experts on each rank (vLLM's
    ``enable_expert_parallel`` with more than one rank: 0.32-0.34 use it then only)."""
    parallel = vllm_config.parallel_config
    ranks = parallel.tensor_parallel_size * parallel.data_parallel_size
    return bool(getattr(parallel, "enable_expert_parallel", False)) and ranks > 1


def distributed_layout() -> ParallelLayout:
    """This process's place in vLLM's model-parallel groups (one rank when they are not
    set up, as outside an engine)."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return ParallelLayout()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pp_group().world_size
    return ParallelLayout(
        tp,
        pp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pp_group().rank_in_group,
    )


def target_device(vllm_config: VllmConfig) -> torch.device:
    """The device this worker's weights go to, with its index (``cuda:N``, ``cpu``)."""
    load_device = vllm_config.load_config.device or vllm_config.device_config.device
    assert load_device is not None  # vLLM sets the device config's device
    device = torch.device(load_device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


def torch_dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def model_dtype(model_config: ModelConfig) -> torch.dtype:
    """The model's dtype: vLLM resolves ``ModelConfig.dtype`` to a `torch.dtype` (its
    annotation also allows the names a user may give)."""
    return cast(torch.dtype, model_config.dtype)


def reload_config(
    config: TensorizerConfig, model_config: ModelConfig | None, started: str | None
) -> TensorizerConfig:
    """The tensorizer settings for ``get_all_weights(model_config, ...)``: those the engine
    started with, unless `model_config` names another model than `started` (the engine's
    model at load time; before any load, the settings' directory): vLLM 0.34's
    ``reload_weights(weights_path=NEW)`` sets ``model_config.model = NEW`` and its default
    loader then reads NEW, so this reads NEW's tensors too (``tensorizer_dir=NEW``, its
    ``model.tensors`` or rank files; keys and other settings kept). A `model_config` model
    that holds no tensors (the local copy of a remote model's config, a directory given
    beside a ``tensorizer_uri``) is the engine's own: the settings stay."""
    import dataclasses

    from ...config.plan import model_directory_tensors
    from ...core.errors import NotFound

    model = str(getattr(model_config, "model", None) or "")
    known = started if started is not None else (config.tensorizer_dir or "")
    if not model or model.rstrip("/") == known.rstrip("/"):
        return config
    try:
        if model_directory_tensors(model, config.options) is None:
            return config
    except NotFound:
        return config
    return dataclasses.replace(config, tensorizer_uri=None, tensorizer_dir=model)


@contextlib.contextmanager
def readers_on_every_core(device: torch.device | str) -> Iterator[None]:
    """Let the loader's reader threads run on every core while the weights load.

    vLLM's CPU backend binds each worker to its OpenMP cores and reserves the others for its
    engine processes, which wait idle during the load; on a small machine that leaves the
    readers one core. Threads inherit the mask of the thread that starts them, so widening
    this thread's mask for the load (and restoring it after) reaches the readers and nothing
    else: vLLM's OpenMP threads keep their binding.
    """
    if torch.device(device).type != "cpu" or not hasattr(os, "sched_setaffinity"):
        yield
        return
    try:
        bound = os.sched_getaffinity(0)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # a cpuset that forbids it: keep vLLM's binding
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, bound)
