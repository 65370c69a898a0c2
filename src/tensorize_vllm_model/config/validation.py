"""The checks of `TensorizerConfig`'s fields: types, booleans given as strings, the keys
each kwargs dict may hold (``stream_kwargs`` by `storage.StreamOptions`, whose backends
check their own keys). Each check names the field or key at fault."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.errors import ConfigError
from ..core.settings import parse_bool

__all__ = ["FORBIDDEN_DESERIALIZATION_KWARGS", "DESERIALIZATION_KWARGS", "checked_fields"]

# vLLM decides the device and dtype; the mode is not for users to set.
FORBIDDEN_DESERIALIZATION_KWARGS = ("device", "dtype", "mode")
# What deserialization_kwargs may hold: tensorizer 2.12's TensorDeserializer arguments that
# the loader does not set itself (it sets lazy_load, filter_func and encryption).
DESERIALIZATION_KWARGS = ("verify_hash", "num_readers", "plaid_mode", "plaid_mode_buffers")

# Keys whose values are booleans, in each kwargs dict (tensorizer 2.12's
# ``TensorDeserializer`` and ``TensorSerializer`` signatures); ``stream_kwargs`` is checked
# by `storage.StreamOptions`, whose backends parse their own booleans.
_BOOLEAN_KWARGS = {
    "stream_kwargs": (),
    "deserialization_kwargs": ("plaid_mode", "verify_hash"),
    "serialization_kwargs": ("compress_tensors",),
}


def checked_fields(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (every field of a `TensorizerConfig`, by name) checked, and normalised:
    kwargs dicts copied (None as empty), "true"/"false" strings as booleans.

    Raises:
        ConfigError: a value of the wrong type or out of range, or a key not allowed in a
            kwargs dict (named).
    """
    values = dict(values)
    for name, booleans in _BOOLEAN_KWARGS.items():
        value = values[name]
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a JSON object (a dict), got {value!r}")
        value = dict(value)
        for key in booleans:
            if key in value:
                value[key] = parse_bool(value[key], f"{name} {key}")
        values[name] = value
    given = set(values["deserialization_kwargs"] or {})
    refused = sorted(given & set(FORBIDDEN_DESERIALIZATION_KWARGS))
    if refused:
        raise ConfigError(
            f"deserialization_kwargs key(s) {', '.join(map(repr, refused))} are not "
            "allowed: vLLM decides the device and dtype of the weights, and the mode is "
            "fixed."
        )
    unknown = sorted(given - set(DESERIALIZATION_KWARGS))
    if unknown:
        raise ConfigError(
            f"unknown deserialization_kwargs key(s) {', '.join(map(repr, unknown))}; "
            f"TensorDeserializer takes {', '.join(DESERIALIZATION_KWARGS)} here (the "
            "loader sets lazy_load, filter_func and encryption itself)"
        )
    readers = values["num_readers"]
    if readers is not None and (
        isinstance(readers, bool) or not isinstance(readers, int) or readers < 1
    ):
        raise ConfigError(f"num_readers must be a positive integer, got {readers!r}")
    for name in ("verify_hash", "vllm_tensorized"):
        values[name] = parse_bool(values[name], name)
    values["stream_kwargs"] = _checked_stream_kwargs(values["stream_kwargs"] or {})
    for name in (
        "tensorizer_uri",
        "tensorizer_dir",
        "encryption_keyfile",
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_endpoint",
        "ca_bundle",
    ):
        value = values[name]
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {type(value).__name__}")
    return values


def _checked_stream_kwargs(given: dict[str, Any]) -> dict[str, Any]:
    """``stream_kwargs`` checked by `storage.StreamOptions` (unknown keys and bad values
    named), its string booleans ("True") as the booleans they say."""
    from ..storage.options import StreamOptions

    checked = StreamOptions.from_mapping(given)
    return {
        key: checked.value(key)
        if isinstance(value, str) and isinstance(checked.value(key), bool)
        else value
        for key, value in given.items()
    }
