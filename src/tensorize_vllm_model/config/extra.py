"""vLLM's ``model_loader_extra_config`` (or a config of vLLM's) as `TensorizerConfig`
fields: the nested ``tensorizer_config`` merged, vLLM's load-time fields dropped, unknown
keys refused by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.errors import ConfigError, extra_config_name

__all__ = ["extra_config_fields"]

# Fields of vLLM's TensorizerConfig that vLLM's loader fills at load time (init=False); they
# are not settings, and are dropped when a vLLM config object is taken in.
_VLLM_RUNTIME_FIELDS = ("model_class", "hf_config", "dtype")


def extra_config_fields(extra: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The config fields in `extra` (a dict, this package's config or vLLM's): vLLM
    (`EngineArgs.create_load_config`) hands the loader a dict holding the user's keys and,
    under ``"tensorizer_config"``, the known keys again plus ``tensorizer_dir`` set to
    ``--model``; a given ``tensorizer_uri`` drops that directory.

    Raises:
        ConfigError: a key that is not one of `fields` (named), or another type.
    """
    extra = _plain_values(extra)
    nested = extra.pop("tensorizer_config", None) or {}
    if not isinstance(nested, Mapping):
        raise ConfigError("model_loader_extra_config['tensorizer_config'] must be an object")
    unknown = sorted(set(extra) - set(fields)) + sorted(set(nested) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {extra_config_name()}: "
            f"{', '.join(map(repr, unknown))}; known keys: {', '.join(fields)}"
        )
    merged = {**nested, **extra}
    if merged.get("tensorizer_uri"):
        merged.pop("tensorizer_dir", None)
    return merged


def _plain_values(config: Any) -> dict[str, Any]:
    """The fields of a config given as a dict, this package's config or vLLM's."""
    if config is None:
        return {}
    if hasattr(config, "to_serializable"):  # a TensorizerConfig, this package's or vLLM's
        values = dict(config.to_serializable())
        for name in _VLLM_RUNTIME_FIELDS:
            values.pop(name, None)
        return values
    if isinstance(config, Mapping):
        values = dict(config)
        if "_is_sharded" in values:
            # Every field of vLLM's config, as vLLM's LoadConfig (pydantic) turns the object
            # into a dict: its private and load-time fields are not settings.
            values = {
                k: v
                for k, v in values.items()
                if not k.startswith("_") and k not in _VLLM_RUNTIME_FIELDS
            }
        return values
    raise ConfigError(
        "a tensorizer config must be a TensorizerConfig (this package's or "
        f"vLLM's) or a dict of its fields, got {type(config).__name__}"
    )
