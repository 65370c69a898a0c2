"""How to reach remote storage: the generic transfer settings, and each backend's own.

`StreamOptions` is built from a `TensorizerConfig` (its credential fields and
``stream_kwargs``, whose keys follow tensorizer's ``open_stream``). The generic layer knows
only the keys every backend shares (`GENERIC_KEYS`: TLS bundle, read-ahead, timeout); any
other key belongs to the backend that declares it (`base.Backend.option_keys`: S3's
endpoint and keys, ...), which validates its own values (`base.Backend.check_options`). A key no
registered backend declares is refused by name, listing the known ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.errors import ConfigError
from ..core.settings import parse_bool
from .ranged import DEFAULT_CHUNK_SIZE, DEFAULT_WORKERS
from .retry import DEFAULT_POLICY, RetryPolicy

__all__ = ["StreamOptions", "Options", "GENERIC_KEYS", "stream_kwargs_keys"]

# Keys every backend shares. buffer_size (tensorizer's) is accepted and has no effect.
GENERIC_KEYS = ("ca_bundle", "buffer_size", "workers", "chunk_size", "timeout", "ranges")
# Words that mark a backend option as secret: never shown by repr().
_SECRET_WORDS = ("secret", "password", "token", "connection_string", "account_key", "sas")


def stream_kwargs_keys() -> tuple[str, ...]:
    """Every ``stream_kwargs`` key known: the generic ones, then each registered backend's."""
    from .base import backend_option_keys

    return GENERIC_KEYS + tuple(k for k in backend_option_keys() if k not in GENERIC_KEYS)


class StreamOptions:
    """Settings of remote reads and writes: immutable and hashable (clients are cached per
    options).

    Args:
        ca_bundle: a PEM file of the CAs to trust for TLS (every backend that speaks TLS).
        workers: ranged requests in flight at most per stream.
        chunk_size: bytes per ranged request.
        timeout: seconds without data before a request or read gives up.
        ranges: False reads a remote file as one sequential response instead of parallel
            byte ranges (for servers that serve ranges slowly).
        retry: how often a request or byte range is tried (`retry.RetryPolicy`; set in
            Python, not a ``stream_kwargs`` key).
        **backend: the options of the backends (each declares its keys in
            `base.Backend.option_keys` and validates their values).

    Raises:
        ConfigError: a key no backend declares, or a value out of range (naming the key).
    """

    __slots__ = ("ca_bundle", "workers", "chunk_size", "timeout", "ranges", "retry", "_backend")
    ca_bundle: str | None
    workers: int
    chunk_size: int
    timeout: float
    ranges: bool
    retry: RetryPolicy
    _backend: tuple[tuple[str, Any], ...]

    def __init__(
        self,
        *,
        ca_bundle: str | None = None,
        workers: int = DEFAULT_WORKERS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float = 30.0,
        ranges: bool = True,
        retry: RetryPolicy = DEFAULT_POLICY,
        **backend: Any,
    ):
        for name, value in (("workers", workers), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"stream_kwargs {name} must be a positive integer")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError("stream_kwargs timeout must be a positive number of seconds")
        set_ = object.__setattr__
        set_(self, "ca_bundle", ca_bundle)
        set_(self, "workers", workers)
        set_(self, "chunk_size", chunk_size)
        set_(self, "timeout", float(timeout))
        set_(self, "ranges", bool(parse_bool(ranges, "stream_kwargs ranges")))
        set_(self, "retry", retry)
        set_(self, "_backend", tuple(sorted(_checked(backend).items())))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | StreamOptions | None) -> StreamOptions:
        """Options from a ``stream_kwargs``-style mapping (None values are left out)."""
        if isinstance(values, StreamOptions):
            return values
        values = {k: v for k, v in dict(values or {}).items() if v is not None}
        values.pop("buffer_size", None)
        return cls(**values)

    def replace(self, **changes: Any) -> StreamOptions:
        """These options with `changes` (generic keys or backend options) applied."""
        values: dict[str, Any] = {name: getattr(self, name) for name in _GENERIC_SLOTS}
        return StreamOptions(**{**values, **dict(self._backend), **changes})

    def value(self, key: str) -> Any:
        """The value of any key, generic or a backend's (None where not given)."""
        return getattr(self, key) if key in _GENERIC_SLOTS else self.get(key)

    def as_mapping(self) -> dict[str, Any]:
        """The plain form (``stream_kwargs`` keys; `from_mapping` gives these options back,
        `retry` aside): what crosses to vLLM's workers, whose RPC carries plain data only."""
        values = {name: getattr(self, name) for name in _GENERIC_SLOTS if name != "retry"}
        return {**values, **dict(self._backend)}

    def get(self, key: str, default: Any = None) -> Any:
        """A backend option's value (`default` where not given)."""
        for name, value in self._backend:
            if name == key:
                return value
        return default

    def backend_options(self) -> dict[str, Any]:
        """Every backend option given, by key."""
        return dict(self._backend)

    def _key(self) -> tuple:
        return (
            self.ca_bundle,
            self.workers,
            self.chunk_size,
            self.timeout,
            self.ranges,
            self.retry,
            self._backend,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("StreamOptions is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StreamOptions) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = [
            f"{name}={'***' if any(w in name for w in _SECRET_WORDS) else value!r}"
            for name, value in self._backend
        ]
        return (
            f"StreamOptions(workers={self.workers}, chunk_size={self.chunk_size}, "
            f"timeout={self.timeout:g}, ranges={self.ranges}"
            + "".join(f", {s}" for s in shown)
            + ")"
        )


_GENERIC_SLOTS = ("ca_bundle", "workers", "chunk_size", "timeout", "ranges", "retry")


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    """Backend options, each validated (and normalised) by the backend(s) declaring it."""
    if not values:
        return {}
    from .base import backend_classes

    owners = backend_classes()
    unknown = sorted(k for k in values if not any(k in c.option_keys for c in owners))
    if unknown:
        raise ConfigError(
            f"unknown stream_kwargs key(s) {', '.join(map(repr, unknown))}; known: "
            + ", ".join(stream_kwargs_keys())
        )
    checked: dict[str, Any] = {}
    for cls in owners:
        mine = {k: v for k, v in values.items() if k in cls.option_keys}
        if mine:
            checked.update(cls.check_options(mine))
    return checked


# What the storage functions take as options: `StreamOptions`, a ``stream_kwargs``-style
# mapping, or None (the defaults).
Options = Mapping[str, Any] | StreamOptions | None
