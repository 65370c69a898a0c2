"""The settings of a serialize or a load, with vLLM's names, fields and meanings:
`TensorizerConfig` (data and validation; the edge that builds the typed
`storage.StreamOptions` every layer below takes) and `TensorizerArgs` (a config resolved
for tensorizer)."""

from __future__ import annotations

from ..format.names import DEFAULT_TENSORS_NAME, SHARDED_TENSORS_NAME
from .flags import TENSORIZER_CLI_FLAGS
from .tensorizer_config import TensorizerArgs, TensorizerConfig, as_tensorizer_config
from .validation import DESERIALIZATION_KWARGS, FORBIDDEN_DESERIALIZATION_KWARGS

__all__ = [
    "TensorizerConfig",
    "TensorizerArgs",
    "as_tensorizer_config",
    "DEFAULT_TENSORS_NAME",
    "SHARDED_TENSORS_NAME",
    "FORBIDDEN_DESERIALIZATION_KWARGS",
    "DESERIALIZATION_KWARGS",
    "TENSORIZER_CLI_FLAGS",
]
