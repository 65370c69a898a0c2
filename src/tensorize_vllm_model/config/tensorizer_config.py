"""`TensorizerConfig`: the settings of a serialize or a load, their data and validation.

Same names, fields and meanings as `vllm.model_executor.model_loader.tensorizer`, so code
written against vLLM's module works by changing the import. The config is the edge: what
the layers below take is its typed `options` (a `storage.StreamOptions`, built once per
distinct settings), the read or write plan made from it, and the plain dict of
`to_serializable()` (to vLLM's workers). `settings.environment` reads the variables.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from ..core.errors import ConfigError
from ..core.redaction import scrubbing
from ..core.settings import environment
from ..format.names import (
    DEFAULT_TENSORS_NAME,
    SHARDED_TENSORS_NAME,
    has_rank_template,
)
from .extra import extra_config_fields
from .flags import TENSORIZER_CLI_FLAGS
from .validation import (
    DESERIALIZATION_KWARGS,
    FORBIDDEN_DESERIALIZATION_KWARGS,
    checked_fields,
)

if TYPE_CHECKING:
    from ..storage.options import StreamOptions

__all__ = [
    "TensorizerConfig",
    "TensorizerArgs",
    "as_tensorizer_config",
    "stream_kwargs_of",
    "DEFAULT_TENSORS_NAME",
    "SHARDED_TENSORS_NAME",
    "FORBIDDEN_DESERIALIZATION_KWARGS",
    "DESERIALIZATION_KWARGS",
]


_MASK = "***"


@dataclass
class TensorizerConfig(MutableMapping):
    """Where serialized tensors are and how to read or write them.

    Attributes:
        tensorizer_uri: the tensors file: a local path, ``s3://bucket/key`` or
            ``http(s)://``. Sharded models use a rank template such as
            ``model-rank-%03d.tensors``. Unless `tensorizer_dir` is given, required.
        tensorizer_dir: a directory holding the tensors and the model's config and tokenizer;
            the tensors are then ``<dir>/model.tensors`` (or one file per rank,
            ``<dir>/model-rank-%03d.tensors``, when loaded with tensor or pipeline
            parallelism). Ignored when `tensorizer_uri` is given.
        vllm_tensorized: deprecated in vLLM; files are recognised by their contents. Kept
            for compatibility, it has no effect.
        verify_hash: check every tensor's stored hash while loading.
        num_readers: reader threads; None lets the loader choose.
        encryption_keyfile: path or URI of the 32-byte key that decrypts the tensors.
        s3_access_key_id, s3_secret_access_key, s3_endpoint: S3 credentials and endpoint;
            when unset, the ``S3_ACCESS_KEY_ID``, ``S3_SECRET_ACCESS_KEY`` and
            ``S3_ENDPOINT_URL`` environment variables are used.
        stream_kwargs: extra keyword arguments for tensorizer's ``open_stream``.
        serialization_kwargs: extra keyword arguments for ``TensorSerializer``.
        deserialization_kwargs: extra keyword arguments for ``TensorDeserializer``
            (``device``, ``dtype`` and ``mode`` are refused: vLLM decides them).
        ca_bundle: a PEM file of CA certificates to trust for HTTPS (S3 endpoints and
            https:// URLs), for servers with a private CA. Not in vLLM's config.

    Example:
        >>> cfg = TensorizerConfig(tensorizer_dir="/models/opt/v1")
        >>> cfg.tensorizer_uri
        '/models/opt/v1/model.tensors'
    """

    tensorizer_uri: str | None = None
    tensorizer_dir: str | None = None
    vllm_tensorized: bool | None = None
    verify_hash: bool | None = None
    num_readers: int | None = None
    encryption_keyfile: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    s3_endpoint: str | None = None
    stream_kwargs: dict[str, Any] | None = None
    serialization_kwargs: dict[str, Any] | None = None
    deserialization_kwargs: dict[str, Any] | None = None
    ca_bundle: str | None = None

    _fields: ClassVar[tuple[str, ...]]
    _keys: ClassVar[frozenset[str]]

    def __post_init__(self) -> None:
        # What the user gave, before the URI is derived from the directory (vLLM's rule):
        # `plan` tells a given URI from a directory's default by it.
        self._given_uri: str | None = self.tensorizer_uri or None
        if self.tensorizer_uri:
            # As in vLLM: the URI wins, and the directory is where it lies.
            self.tensorizer_dir = _parent(self.tensorizer_uri)
        elif self.tensorizer_dir:
            self.tensorizer_uri = f"{self.tensorizer_dir.rstrip('/')}/{DEFAULT_TENSORS_NAME}"
        else:
            raise ConfigError(
                "Unable to resolve tensorizer_uri: give tensorizer_uri (the tensors file) "
                "or tensorizer_dir (the directory holding model.tensors)."
            )
        self._validate()
        self._ready = True

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "tensorizer_uri" and self.__dict__.get("_ready"):
            # A URI set after construction is the user's too.
            super().__setattr__("_given_uri", value or None)

    def _validate(self) -> None:
        values = {name: getattr(self, name) for name in self._fields}
        for name, value in checked_fields(values).items():
            setattr(self, name, value)

    # -- construction from vLLM's load config -------------------------------------------

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> TensorizerConfig:
        """Build a config from vLLM's ``model_loader_extra_config``.

        vLLM (`EngineArgs.create_load_config`) hands the loader a dict holding the user's
        keys and, under ``"tensorizer_config"``, the known keys again plus
        ``tensorizer_dir`` set to ``--model``. Keys that are not config fields are refused
        by name. `extra` may also be a `TensorizerConfig`, this package's or vLLM's.
        """
        merged = extra_config_fields(extra, cls._fields)
        return cls(**merged)

    def to_serializable(self) -> dict[str, Any]:
        """The config as a plain dict that ``TensorizerConfig(**d)`` accepts again.

        Unset (None) fields are left out, and so are empty kwargs dicts. What the user gave
        of ``tensorizer_uri`` and ``tensorizer_dir`` is kept: the URI when given (the
        directory follows from it), else the directory (the URI follows from it).
        """
        out: dict[str, Any] = {}
        skip = "tensorizer_dir" if self._given_uri else "tensorizer_uri"
        for name in self._fields:
            value = getattr(self, name)
            if value is None or name == skip or (isinstance(value, dict) and not value):
                continue
            out[name] = value
        return out

    def _construct_tensorizer_args(self) -> TensorizerArgs:

        return TensorizerArgs(self)

    # -- vLLM's checks and stream, same signatures (vLLM 0.32's TensorizerConfig) ---------

    def verify_with_parallel_config(self, parallel_config: Any) -> None:
        """Refuse a layout of more than one rank when the given `tensorizer_uri` has no rank
        template (``%03d``), as vLLM's method does for tensor parallelism. Here pipeline
        parallel ranks count too (one file per rank), and a config given only
        ``tensorizer_dir`` passes: its ranks write and read ``model-rank-%03d.tensors``.
        The rule is the write plan's (`plan.check_rank_files`).

        Args:
            parallel_config: vLLM's `ParallelConfig` (``tensor_parallel_size``,
                ``pipeline_parallel_size``).

        Raises:
            ConfigError: (a ValueError, as vLLM raises) naming the URI and the layout.
        """
        from ..format.record import ParallelLayout
        from .plan import check_rank_files

        layout = ParallelLayout(
            int(getattr(parallel_config, "tensor_parallel_size", 1) or 1),
            int(getattr(parallel_config, "pipeline_parallel_size", 1) or 1),
        )
        check_rank_files(self, layout)

    def verify_with_model_config(self, model_config: Any) -> None:
        """Warn, as vLLM does, that loading a quantized model (``model_config.quantization``
        set) with tensorizer is unstable. Never raises."""
        if getattr(model_config, "quantization", None) is not None and self.tensorizer_uri:
            scrubbing(__name__).warning(
                "Loading a model using Tensorizer with quantization on vLLM is unstable and "
                "may lead to errors."
            )

    def open_stream(self, tensorizer_args: TensorizerArgs | None = None) -> BinaryIO:
        """Open `tensorizer_uri` for binary reading (local path, ``s3://`` or
        ``http(s)://``), with the stream settings of `tensorizer_args` (default: this
        config's credentials, ``ca_bundle`` and ``stream_kwargs``). A context manager.

        Raises:
            StorageError: naming the URI when it cannot be opened.
        """
        from .. import storage

        options = tensorizer_args.stream_kwargs if tensorizer_args else self.options
        return storage.open_read(self.tensorizer_uri or "", options)

    # -- derived facts -------------------------------------------------------------------

    @property
    def given_uri(self) -> str | None:
        """``tensorizer_uri`` as the user gave it; None when it was derived from
        ``tensorizer_dir``."""
        return self._given_uri

    @property
    def is_sharded(self) -> bool:
        """Whether `tensorizer_uri` holds a rank template such as ``%03d``."""
        return has_rank_template(self.tensorizer_uri)

    @property
    def _is_sharded(self) -> bool:  # vLLM's name
        return self.is_sharded

    @property
    def options(self) -> StreamOptions:
        """How to reach remote storage, typed: what every layer below takes. From the
        credential fields (each, when unset, from its variable: ``S3_ACCESS_KEY_ID``,
        ``S3_SECRET_ACCESS_KEY``, ``S3_ENDPOINT_URL``), `ca_bundle`, then `stream_kwargs`
        (which win; same keys as tensorizer's ``open_stream``). Built once, and again only
        when those settings change.

        Raises:
            ConfigError: an invalid ``stream_kwargs`` value (named).
        """
        from ..storage.options import StreamOptions

        given = stream_kwargs_of(self)
        cached = self.__dict__.get("_options")
        if cached is None or cached[0] != given:
            cached = (given, StreamOptions.from_mapping(given))
            object.__setattr__(self, "_options", cached)
        return cached[1]

    def __repr__(self) -> str:
        shown = []
        for name in self._fields:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "s3_secret_access_key":
                value = _MASK
            shown.append(f"{name}={value!r}")
        return f"TensorizerConfig({', '.join(shown)})"

    # -- mapping access, as vLLM's config offers ----------------------------------------

    def keys(self):
        return self._keys

    def __len__(self) -> int:
        return len(self._fields)

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._keys:
            raise KeyError(key)
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self._keys:
            raise KeyError(key)
        setattr(self, key, None)


TensorizerConfig._fields = tuple(f.name for f in fields(TensorizerConfig))
TensorizerConfig._keys = frozenset(TensorizerConfig._fields)


class TensorizerArgs:
    """A config resolved for tensorizer: stream and deserializer keyword arguments.

    Mirrors vLLM's `TensorizerArgs`: built from a `TensorizerConfig`, it resolves the S3
    credentials from the environment, reads the decryption key (when
    `encryption_keyfile` is set) and offers `stream_kwargs` for ``open_stream`` and
    `deserialization_kwargs` for ``TensorDeserializer``. `add_cli_args` adds the
    "tensorizer options" argument group of vLLM's example script.
    """

    def __init__(self, tensorizer_config: TensorizerConfig | Mapping[str, Any]):
        tensorizer_config = as_tensorizer_config(tensorizer_config)
        self.config = tensorizer_config
        self.tensorizer_uri = tensorizer_config.tensorizer_uri
        self.tensorizer_dir = tensorizer_config.tensorizer_dir
        self.encryption_keyfile = tensorizer_config.encryption_keyfile
        self.file_obj = tensorizer_config.tensorizer_uri
        # vLLM's attributes: the credentials (else the S3_* variables) and open_stream's
        # keyword arguments, as plain values of the config's options.
        self.stream_kwargs: dict[str, Any] = stream_kwargs_of(tensorizer_config)
        self.s3_access_key_id = self.stream_kwargs.get("s3_access_key_id")
        self.s3_secret_access_key = self.stream_kwargs.get("s3_secret_access_key")
        self.s3_endpoint = self.stream_kwargs.get("s3_endpoint")
        self.serialization_kwargs = dict(tensorizer_config.serialization_kwargs or {})
        self.deserialization_kwargs: dict[str, Any] = {
            "verify_hash": bool(tensorizer_config.verify_hash),
            "num_readers": tensorizer_config.num_readers,
            **(tensorizer_config.deserialization_kwargs or {}),
        }
        if self.encryption_keyfile:
            from ..format.keys import read_decryption_params

            self.deserialization_kwargs["encryption"] = read_decryption_params(
                self.encryption_keyfile, tensorizer_config
            )

    def __repr__(self) -> str:
        return (
            f"TensorizerArgs(tensorizer_uri={self.tensorizer_uri!r}, "
            f"encryption_keyfile={self.encryption_keyfile!r})"
        )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the "tensorizer options" group (flags of vLLM's example script, from
        `TENSORIZER_CLI_FLAGS`); it is the parser's last argument group."""
        group = parser.add_argument_group(
            "tensorizer options",
            description=(
                "How the tensorizer deserializer reads the tensors. The same settings can be "
                "given as a JSON object to --model-loader-extra-config (vllm serve) or as "
                "TensorizerConfig fields to model_loader_extra_config (LLM)."
            ),
        )
        for flag, keywords in TENSORIZER_CLI_FLAGS.items():
            group.add_argument(flag, **keywords)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> TensorizerArgs:
        """Build from parsed flags (those of `add_cli_args`)."""
        values = {
            name: getattr(args, name)
            for name in TensorizerConfig._fields
            if getattr(args, name, None) is not None
        }
        return cls(TensorizerConfig(**values))


def as_tensorizer_config(config: Any) -> TensorizerConfig:
    """This package's `TensorizerConfig` from one of its own (returned as it is), vLLM's
    ``vllm.model_executor.model_loader.tensorizer.TensorizerConfig`` or a dict of either's
    fields (vLLM's ``model_loader_extra_config`` form included).

    Raises:
        ConfigError: another type, or unknown or invalid fields (named).
    """
    if isinstance(config, TensorizerConfig):
        return config
    return TensorizerConfig.from_extra_config(config)


def stream_kwargs_of(config: TensorizerConfig) -> dict[str, Any]:
    """The plain form of `TensorizerConfig.options` (``open_stream``'s keyword arguments, as
    vLLM's `TensorizerArgs.stream_kwargs` holds them); the environment is read now."""
    env = environment()
    options: dict[str, Any] = {
        "s3_access_key_id": _first(config.s3_access_key_id, env.s3_access_key_id),
        "s3_secret_access_key": _first(config.s3_secret_access_key, env.s3_secret_access_key),
        "s3_endpoint": _first(config.s3_endpoint, env.s3_endpoint_url),
    }
    if config.ca_bundle:
        options["ca_bundle"] = config.ca_bundle
    return {**options, **(config.stream_kwargs or {})}


def _parent(uri: str) -> str:
    head, _, _ = uri.rstrip("/").rpartition("/")
    return head or "."


def _first(*values: str | None) -> str | None:
    for value in values:
        if value is not None:
            return value
    return None
