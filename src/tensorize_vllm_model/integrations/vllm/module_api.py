"""The names of vLLM 0.32's ``vllm.model_executor.model_loader.tensorizer`` that need an
engine's or a model's vLLM internals (`init_tensorizer_model`, `deserialize_tensorizer_model`,
`serialize_vllm_model`), and `tensorized_lora_request`. The pure names are in `vllm_api`;
both are re-exported by the package.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.logger import init_logger
from vllm.utils.torch_utils import set_default_torch_dtype

from ... import storage
from ...config import TensorizerConfig, as_tensorizer_config
from ...config.plan import resolve_write
from ...core.errors import ConfigError
from ...core.redaction import scrubbing
from ...format.record import FileRecord
from ...format.writer import write_tensors
from ...read.modules import load_into_module, meta_parameters
from ...read.reader import open_tensors
from .engine import vllm_version
from .runtime import distributed_layout, model_dtype, target_device, torch_dtype_name

__all__ = [
    "init_tensorizer_model",
    "deserialize_tensorizer_model",
    "serialize_vllm_model",
    "tensorized_lora_request",
]

logger = scrubbing(init_logger(f"vllm.{__name__}"))


def init_tensorizer_model(tensorizer_config: Any, vllm_config: VllmConfig) -> nn.Module:
    """The model of `vllm_config`, built with its ``torch.empty`` parameters on the meta
    device (no memory, no initialisation), for `deserialize_tensorizer_model` to fill. As
    vLLM 0.32's function; vLLM's loader sets ``model_class`` on its config first, and the
    class is taken from `vllm_config` when the config (this package's) has none.
    """
    from vllm.model_executor.model_loader.utils import initialize_model

    model_config = vllm_config.model_config
    device = target_device(vllm_config)
    model_class = getattr(tensorizer_config, "model_class", None)
    with (
        set_default_torch_dtype(model_dtype(model_config)),
        torch.device(device),
        meta_parameters(device),
    ):
        if model_class is None:
            return initialize_model(vllm_config=vllm_config, model_config=model_config)
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(vllm_config, check_compile=True):
            return model_class(vllm_config=vllm_config)


def deserialize_tensorizer_model(model: nn.Module, tensorizer_config: Any) -> None:
    """Fill `model`'s parameters and buffers from ``tensorizer_uri`` (one rank's file: the
    URI as given, already formatted), onto the device of the current platform, as vLLM
    0.32's function. `tensorizer_config` is this package's `TensorizerConfig`, vLLM's, or
    a dict of its fields.

    Raises:
        ValueError: `tensorizer_uri` is neither an existing local path nor an S3 or
            HTTP(S) URI (vLLM's check).
        ModelMismatchError: a tensor of the model is not in the file, or does not fit
            (where vLLM finds tensors left on the meta device).
        StorageError, FormatError, EncryptionError: as `read.reader.open_tensors`.
    """
    from vllm.platforms import current_platform

    from .api import is_valid_deserialization_uri

    config = as_tensorizer_config(tensorizer_config)
    uri = config.tensorizer_uri  # one rank's file, as vLLM's function takes it
    if not is_valid_deserialization_uri(uri):
        raise ConfigError(
            f"{uri} is not a valid tensorizer URI: it must be an existing "
            "local file, or have a remote scheme ("
            + ", ".join(s for s in storage.supported_schemes() if s != "file")
            + ")"
        )
    device = torch.device(current_platform.device_type)
    if device.type != "cpu":
        device = torch.device(device.type, torch.accelerator.current_device_index())
    assert uri is not None
    with open_tensors(uri, device=device, config=config) as reader:
        stats = load_into_module(model, reader)
    logger.info(
        "Deserialized %.3f GB in %.2f s (%.2f GB/s) from %s",
        stats.bytes / 1e9,
        stats.seconds,
        stats.gb_per_s,
        stats.uri,
    )


def serialize_vllm_model(
    model: nn.Module, tensorizer_config: Any, model_config: ModelConfig
) -> nn.Module:
    """Write `model`'s parameters and buffers as they are now to ``tensorizer_uri``
    (formatted with this process's rank when it holds a rank template), encrypted with the
    key in ``encryption_keyfile`` when set, then its config and tokenizer files beside it
    (`serialize_extra_artifacts`). As vLLM 0.32's function, with this package's file record
    and all-or-nothing writes; returns `model`.

    On vLLM's CPU backend, call it before vLLM's weight post-processing, which empties the
    linear weights (`tensorize_vllm_model` does so).

    Raises:
        ConfigError: no ``tensorizer_uri``, or several ranks and no rank template.
        EncryptionError: the key file is missing or not a 32-byte key.
        StorageError: the file cannot be written (nothing is left at its name).
    """
    from ... import __version__
    from ...format.keys import read_key
    from .api import serialize_extra_artifacts

    config = as_tensorizer_config(tensorizer_config)
    plan = resolve_write(config, distributed_layout())
    layout = plan.layout
    key = read_key(plan.keyfile, config) if plan.keyfile else None
    tensors = [(name, p.detach(), False) for name, p in model.named_parameters()]
    tensors += [(name, b.detach(), True) for name, b in model.named_buffers()]
    record = FileRecord(
        architecture=type(model).__name__,
        dtype=torch_dtype_name(model_config.dtype),
        tensor_parallel_size=layout.tensor_parallel_size,
        pipeline_parallel_size=layout.pipeline_parallel_size,
        rank=layout.rank,
        producer=f"tensorize_vllm_model {__version__}, vllm {vllm_version()}",
    )
    write_tensors(
        plan.uri,
        tensors,
        record=record,
        key=key,
        serialization_kwargs=plan.serialization_kwargs,
        options=plan.options,
    ).commit()
    serialize_extra_artifacts(
        config._construct_tensorizer_args(),
        model_config.served_model_name,
        revision=model_config.revision,
    )
    logger.info("Serialized the model to %s", storage.redact(plan.uri))
    return model


def tensorized_lora_request(
    model: str,
    adapter: str,
    *,
    lora_int_id: int | None = None,
    tensorizer_config: TensorizerConfig | dict | None = None,
) -> Any:
    """A `vllm.lora.request.LoRARequest` for adapter `adapter` of serialized model `model`.

    The adapter (``<model>/lora/<adapter>``, local, S3 or HTTP(S)) is deserialized into CPU
    memory and handed to vLLM as a PEFT directory in RAM-backed storage (see `lora`).

    Args:
        model: the serialized model directory (as passed to ``LLM(...)``).
        adapter: the adapter's name (its ``--lora-path`` directory name when serialized).
        lora_int_id: vLLM's integer id for the adapter (default: derived from the name).
        tensorizer_config: how to read it (``encryption_keyfile``, S3 credentials...): this
            package's `TensorizerConfig`, vLLM's, or a dict of its fields.

    Example:
        >>> llm = LLM(model_dir, load_format="tensorizer", enable_lora=True)  # doctest: +SKIP
        >>> llm.generate(prompts, params,
        ...              lora_request=tensorized_lora_request(model_dir, "my-adapter"))
    """
    from vllm.lora.request import LoRARequest

    from ...artifacts.lora import adapter_uri, materialize_adapter

    if isinstance(tensorizer_config, dict):
        tensorizer_config = TensorizerConfig.from_extra_config(
            {"tensorizer_dir": model, **tensorizer_config}
        )
    elif tensorizer_config is not None:
        tensorizer_config = as_tensorizer_config(tensorizer_config)
    path = materialize_adapter(adapter_uri(model, adapter), tensorizer_config, name=adapter)
    if lora_int_id is None:
        lora_int_id = 1 + int(hashlib.sha256(adapter.encode()).hexdigest(), 16) % (2**31 - 2)
    return LoRARequest(lora_name=adapter, lora_int_id=lora_int_id, lora_path=path)
