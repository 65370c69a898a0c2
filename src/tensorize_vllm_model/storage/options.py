"""How to reach remote storage: credentials, endpoint, TLS and read-ahead settings.

`StreamOptions` is built from a `TensorizerConfig` (its S3 fields and ``stream_kwargs``,
whose keys follow tensorizer's ``open_stream``). Unknown ``stream_kwargs`` keys are refused
by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from ..settings import parse_bool
from .ranged import DEFAULT_CHUNK_SIZE, DEFAULT_WORKERS
from .retry import DEFAULT_POLICY, RetryPolicy

__all__ = ["StreamOptions", "Options", "STREAM_KWARGS", "ADDRESSING_STYLES"]

# tensorizer's open_stream keywords we honour, plus our own read-ahead knobs. buffer_size
# is accepted for compatibility and has no effect.
STREAM_KWARGS = (
    "s3_access_key_id",
    "s3_secret_access_key",
    "s3_endpoint",
    "s3_config_path",
    "s3_region_name",
    "s3_signature_version",
    "addressing_style",
    "force_http",
    "ca_bundle",
    "buffer_size",
    "workers",
    "chunk_size",
    "timeout",
    "ranges",
)
ADDRESSING_STYLES = ("auto", "virtual", "path")


@dataclass(frozen=True)
class StreamOptions:
    """Settings of remote reads and writes (hashable: clients are cached per options)."""

    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = field(default=None, repr=False)
    s3_endpoint: str | None = None
    s3_config_path: str | None = None
    s3_region_name: str | None = None
    s3_signature_version: str | None = None
    # S3 request style (botocore's names): "virtual" (https://BUCKET.host/KEY), "path"
    # (https://host/BUCKET/KEY) or "auto"; None: chosen for the endpoint (see s3_settings).
    addressing_style: str | None = None
    force_http: bool = False
    ca_bundle: str | None = None
    workers: int = DEFAULT_WORKERS
    chunk_size: int = DEFAULT_CHUNK_SIZE
    timeout: float = 30.0
    # False: read a remote file as one sequential response instead of parallel byte ranges
    # (for servers that serve ranges slowly).
    ranges: bool = True
    # How often a request or byte range is tried (storage/retry.py: the one retry policy of
    # S3 and HTTP(S)). Not a stream_kwargs key: set in Python (tests keep the pauses short).
    retry: RetryPolicy = DEFAULT_POLICY

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | StreamOptions | None) -> StreamOptions:
        if isinstance(values, StreamOptions):
            return values
        values = {k: v for k, v in dict(values or {}).items() if v is not None}
        unknown = sorted(set(values) - set(STREAM_KWARGS))
        if unknown:
            raise ConfigError(
                f"unknown stream_kwargs key(s) {', '.join(map(repr, unknown))}; known: "
                + ", ".join(STREAM_KWARGS)
            )
        values.pop("buffer_size", None)
        for name in ("force_http", "ranges"):
            if name in values:  # "true"/"false" strings too, as older vLLM docs give them
                values[name] = parse_bool(values[name], f"stream_kwargs {name}")
        style = values.get("addressing_style")
        if style is not None and style not in ADDRESSING_STYLES:
            raise ConfigError(
                f"stream_kwargs addressing_style must be one of "
                f"{', '.join(ADDRESSING_STYLES)}, got {style!r}"
            )
        for name in ("workers", "chunk_size"):
            if name in values and (not isinstance(values[name], int) or values[name] < 1):
                raise ConfigError(f"stream_kwargs {name} must be a positive integer")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# What the storage functions take as options: `StreamOptions`, a ``stream_kwargs``-style
# mapping, or None (the defaults).
Options = Mapping[str, Any] | StreamOptions | None
