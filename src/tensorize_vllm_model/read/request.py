"""A read's settings turned into a `ReadRequest`, once: `request_from_config` takes this
package's `TensorizerConfig`, vLLM's, or a dict of its fields (as `read.reader.open_tensors`
does), reads the key file it names, and keeps the typed stream options
(`TensorizerConfig.options`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import TensorizerConfig, as_tensorizer_config
from .base import ReadRequest

__all__ = ["request_from_config"]


def request_from_config(
    uri: str,
    config: TensorizerConfig | Mapping[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
    decryption: Any = None,
    header_only: bool = False,
) -> ReadRequest:
    """The `ReadRequest` for `uri` under `config` (see `open_tensors`); the key is read from
    ``config.encryption_keyfile`` when `decryption` is not given.

    Raises:
        as `keys.read_decryption_params` (a missing or malformed key file).
    """
    config = (
        as_tensorizer_config(_naming_file(config, uri))
        if config is not None
        else TensorizerConfig(tensorizer_uri=uri)
    )
    if decryption is None and config.encryption_keyfile:
        from ..format.keys import read_decryption_params

        decryption = read_decryption_params(config.encryption_keyfile, config)
    extra = dict(config.deserialization_kwargs or {})
    return ReadRequest(
        uri=uri,
        device=device,
        decryption=decryption,
        keyfile=config.encryption_keyfile,
        stream_options=config.options,
        verify_hash=bool(extra.pop("verify_hash", config.verify_hash)),
        num_readers=extra.pop("num_readers", config.num_readers),
        deserialization_kwargs=dict(config.deserialization_kwargs or {}),
        header_only=header_only,
    )


def _naming_file(config: Any, uri: str) -> Any:
    """`config` as given, or, a dict of settings that names no file (``{"verify_hash":
    True}``, flat or under ``tensorizer_config``), with ``tensorizer_uri`` set to `uri`:
    the file opened is `uri` whatever the settings name."""
    if not isinstance(config, Mapping):
        return config
    inner = config.get("tensorizer_config")
    if isinstance(inner, Mapping):
        return {**config, "tensorizer_config": _naming_file(inner, uri)}
    if config.get("tensorizer_uri") or config.get("tensorizer_dir"):
        return config
    return {**config, "tensorizer_uri": uri}
