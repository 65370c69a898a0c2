"""Serialize vLLM models with CoreWeave's tensorizer and stream them back into vLLM fast.

    from tensorize_vllm_model import TensorizerConfig, tensorize_vllm_model
    tensorize_vllm_model(EngineArgs(model="/models/opt"),
                         TensorizerConfig(tensorizer_uri="/out/model.tensors"))
    llm = LLM("/out", load_format="tensorizer")

Every public name of vLLM 0.32's ``vllm.model_executor.model_loader.tensorizer`` is here
too, with vLLM's signature and meaning (docs/compatibility.md, "vLLM's tensorizer module,
name by name"),
so code written against vLLM's module works by changing the import. Heavy modules (torch,
vLLM, tensorizer) load only when a name that needs them is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .config import TensorizerArgs, TensorizerConfig  # noqa: E402
from .core.errors import (  # noqa: E402
    AccessDenied,
    AlreadyExists,
    ConfigError,
    EncryptionError,
    FormatError,
    LayoutError,
    ModelMismatchError,
    NotFound,
    Stalled,
    StorageError,
    TensorizeError,
    Throttled,
    Unreachable,
)

if TYPE_CHECKING:  # the lazy names below, for type checkers
    from .inspection.checks import is_vllm_tensorized
    from .integrations.vllm.api import (
        MetaTensorMode,
        is_valid_deserialization_uri,
        meta_tensor_mode,
        serialize_extra_artifacts,
        tensorizer_kwargs_arg,
        tensorizer_weights_iterator,
    )
    from .integrations.vllm.messages import WORKER_EXTENSION
    from .integrations.vllm.module_api import (
        deserialize_tensorizer_model,
        init_tensorizer_model,
        serialize_vllm_model,
        tensorized_lora_request,
    )
    from .integrations.vllm.serialize import tensorize_vllm_model
    from .read.modules import load_into_module
    from .read.reader import open_tensors

# tensorizer's own objects, as vLLM's tensorizer module re-exports them
_TENSORIZER_NAMES = (
    "EncryptionParams",
    "DecryptionParams",
    "TensorDeserializer",
    "TensorSerializer",
    "open_stream",
    "convert_bytes",
    "get_mem_usage",
    "no_init_or_tensor",
)
# The names imported on first use (`__getattr__`), each with the module it comes from: one
# table, read by `__getattr__` and `__all__`, so importing the package loads no torch, vLLM
# or tensorizer. A lazy name is also imported under TYPE_CHECKING above, for type checkers
# (tests/contract/test_vllm_names.py checks the two agree); the config and the errors are imported at
# once and listed in `__all__` by hand (ruff checks those two agree).
_LAZY = {
    "tensorize_vllm_model": "integrations.vllm.serialize",
    "is_vllm_tensorized": "inspection.checks",
    "tensorized_lora_request": "integrations.vllm.module_api",
    "open_tensors": "read.reader",
    "load_into_module": "read.modules",
    "WORKER_EXTENSION": "integrations.vllm.messages",
    # vLLM 0.32's tensorizer module: its own names, then tensorizer's
    "is_valid_deserialization_uri": "integrations.vllm.api",
    "tensorizer_kwargs_arg": "integrations.vllm.api",
    "MetaTensorMode": "integrations.vllm.api",
    "meta_tensor_mode": "integrations.vllm.api",
    "tensorizer_weights_iterator": "integrations.vllm.api",
    "serialize_extra_artifacts": "integrations.vllm.api",
    "init_tensorizer_model": "integrations.vllm.module_api",
    "deserialize_tensorizer_model": "integrations.vllm.module_api",
    "serialize_vllm_model": "integrations.vllm.module_api",
    **dict.fromkeys(_TENSORIZER_NAMES, "integrations.vllm.api"),
}

__all__ = [
    "__version__",
    "TensorizerConfig",
    "TensorizerArgs",
    "TensorizeError",
    "ConfigError",
    "StorageError",
    "NotFound",
    "AccessDenied",
    "Unreachable",
    "Stalled",
    "Throttled",
    "AlreadyExists",
    "EncryptionError",
    "FormatError",
    "ModelMismatchError",
    "LayoutError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
