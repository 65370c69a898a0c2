"""Serialize vLLM models with CoreWeave's tensorizer and stream them back into vLLM fast.

    from tensorize_vllm_model import TensorizerConfig, tensorize_vllm_model
    tensorize_vllm_model(EngineArgs(model="/models/opt"),
                         TensorizerConfig(tensorizer_uri="/out/model.tensors"))
    llm = LLM("/out", load_format="tensorizer")

The names mirror ``vllm.model_executor.model_loader.tensorizer``. Heavy modules (torch,
vLLM, tensorizer) load only when a name that needs them is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .config import TensorizerArgs, TensorizerConfig  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    EncryptionError,
    FormatError,
    LayoutError,
    ModelMismatchError,
    StorageError,
    TensorizeError,
)

if TYPE_CHECKING:
    from .serialization import tensorize_vllm_model
    from .streaming import is_vllm_tensorized, load_into_module, open_tensors
    from .vllm_adapter import tensorized_lora_request

__all__ = [
    "__version__",
    "TensorizerConfig",
    "TensorizerArgs",
    "tensorize_vllm_model",
    "is_vllm_tensorized",
    "tensorized_lora_request",
    "open_tensors",
    "load_into_module",
    "TensorizeError",
    "ConfigError",
    "StorageError",
    "EncryptionError",
    "FormatError",
    "ModelMismatchError",
    "LayoutError",
]

_LAZY = {
    "tensorize_vllm_model": "serialization",
    "is_vllm_tensorized": "streaming",
    "tensorized_lora_request": "vllm_adapter",
    "open_tensors": "streaming",
    "load_into_module": "streaming",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
