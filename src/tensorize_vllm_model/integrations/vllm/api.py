"""The public names of vLLM 0.32's ``vllm.model_executor.model_loader.tensorizer``, with
vLLM's signatures and meanings, that need no vLLM internals (those that do live in
`integrations.vllm.module_api`: `init_tensorizer_model`, `deserialize_tensorizer_model`,
`serialize_vllm_model`). Code written against vLLM's module works by changing the import;
where a name behaves differently here, docs/compatibility.md ("vLLM's tensorizer module,
name by name") says how and why.

tensorizer's own names that vLLM's module re-exports (``TensorSerializer``,
``TensorDeserializer``, ``EncryptionParams``, ``DecryptionParams``, ``open_stream``,
``convert_bytes``, ``get_mem_usage``, ``no_init_or_tensor``) are re-exported too, lazily:
they are tensorizer's objects themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ...config import TensorizerArgs, as_tensorizer_config
from ...core.errors import ConfigError

__all__ = [
    "is_valid_deserialization_uri",
    "tensorizer_kwargs_arg",
    "MetaTensorMode",
    "meta_tensor_mode",
    "tensorizer_weights_iterator",
    "serialize_extra_artifacts",
    "TENSORIZER_NAMES",
]

# Names vLLM's module re-exports from tensorizer, and where tensorizer keeps them.
TENSORIZER_NAMES = {
    "EncryptionParams": "tensorizer",
    "DecryptionParams": "tensorizer",
    "TensorDeserializer": "tensorizer",
    "TensorSerializer": "tensorizer",
    "open_stream": "tensorizer.stream_io",
    "convert_bytes": "tensorizer.utils",
    "get_mem_usage": "tensorizer.utils",
    "no_init_or_tensor": "tensorizer.utils",
}


def is_valid_deserialization_uri(uri: str | None) -> bool:
    """Whether `uri` can be deserialized from: a URI of a registered remote scheme (any
    case: ``s3://``, ``gs://``, ``az://``, ``http(s)://``, or one another package registers;
    `storage.supported_schemes`), or a local path that exists. As vLLM 0.32's function,
    whose list is ``s3``, ``http``, ``https``.

    Example:
        >>> is_valid_deserialization_uri("s3://bucket/model.tensors")
        True
    """
    if not uri:
        return False
    from ... import storage

    scheme = uri.lower().split("://", 1)[0] if "://" in uri else ""
    remote = scheme not in ("", "file") and scheme in storage.supported_schemes()
    return remote or os.path.exists(uri)


def tensorizer_kwargs_arg(value: str) -> dict[str, Any]:
    """An argparse ``type=``: a JSON object given on the command line, as a dict (vLLM's
    ``--serialization-kwargs`` / ``--deserialization-kwargs``).

    Raises:
        argparse.ArgumentTypeError: the text is not JSON, or not a JSON object.
    """
    try:
        loaded = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value}") from None
    if not isinstance(loaded, dict):
        raise argparse.ArgumentTypeError(
            f"Not deserializable to dict: {value}. serialization_kwargs and "
            "deserialization_kwargs must be a JSON object (a dictionary)."
        )
    return loaded


class MetaTensorMode(TorchDispatchMode):
    """Sends every ``torch.empty`` that names no device to the meta device (as vLLM's):
    modules built inside it cost no memory and no initialisation."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func._schema.name == "aten::empty" and "device" not in kwargs:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def meta_tensor_mode(loading_code: Callable[[], Any] | None = None):
    """Build modules with their parameters on meta: with no argument, a context manager;
    with a callable, its result built inside the mode. As vLLM's.

    Raises:
        TypeError: `loading_code` is neither None nor callable.
    """
    if loading_code is None:
        return _meta_context()
    if callable(loading_code):
        with _meta_context():
            return loading_code()
    raise TypeError(
        "expected a callable to evaluate, or None if being used as a context "
        f"manager; got an object of type {type(loading_code).__name__!r} instead."
    )


@contextlib.contextmanager
def _meta_context() -> Iterator[None]:
    with MetaTensorMode():
        yield


def tensorizer_weights_iterator(
    tensorizer_args: TensorizerArgs | Any,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """Every tensor of ``tensorizer_args.tensorizer_uri``, read into CPU memory, as
    ``(name, tensor)`` in file order (for ``model.load_weights``). As vLLM's, except that
    the file's marker and record (see `layout`) are left out. `tensorizer_args` is this
    package's `TensorizerArgs` or vLLM's.

    Raises:
        StorageError, FormatError, EncryptionError: as `read.reader.open_tensors`.
    """
    from ...config.plan import resolve_read
    from ...format.record import ParallelLayout
    from ...read.reader import open_tensors

    args = _as_args(tensorizer_args)
    plan = resolve_read(args.config, ParallelLayout())
    with open_tensors(plan.uri, device="cpu", config=args.config) as reader:
        yield from reader.items()


def serialize_extra_artifacts(
    tensorizer_args: TensorizerArgs | Any,
    served_model_name: str | list[str] | None,
    revision: str | None = None,
) -> None:
    """Copy the config, tokenizer and generation files of `served_model_name` (a local
    directory, or a Hub id where a Hub is reachable) into ``tensorizer_args.tensorizer_dir``
    (local or ``s3://``). As vLLM's, which only downloads from the Hub; each file appears
    whole or not at all.

    Raises:
        ValueError: `served_model_name` is not a string (as vLLM raises).
        StorageError: a file cannot be read or written.
    """
    from ... import storage
    from ...artifacts.model_files import resolve_model_files, stage_artifacts

    if not isinstance(served_model_name, str):
        raise ValueError(
            "served_model_name must be a str for serialize_extra_artifacts, "
            f"not {type(served_model_name)}."
        )
    from ...config.plan import resolve_write
    from ...format.record import ParallelLayout

    args = _as_args(tensorizer_args)
    plan = resolve_write(args.config, ParallelLayout())
    source = resolve_model_files(served_model_name, revision=revision)
    with storage.transaction(plan.options) as tx:
        stage_artifacts(tx, [source], plan.directory)


def _as_args(tensorizer_args: Any) -> TensorizerArgs:
    """This package's `TensorizerArgs` from its own or vLLM's (which keeps the config's
    fields as attributes, and merged kwargs)."""
    if isinstance(tensorizer_args, TensorizerArgs):
        return tensorizer_args
    from ...config import TensorizerConfig

    if not hasattr(tensorizer_args, "tensorizer_uri"):
        raise ConfigError(
            "expected a TensorizerArgs (this package's or vLLM's), got "
            f"{type(tensorizer_args).__name__}"
        )
    values = {
        name: getattr(tensorizer_args, name)
        for name in TensorizerConfig._fields
        if getattr(tensorizer_args, name, None) is not None
        and name not in ("stream_kwargs", "deserialization_kwargs", "tensorizer_dir")
    }
    credentials = ("s3_access_key_id", "s3_secret_access_key", "s3_endpoint")
    values["stream_kwargs"] = {
        k: v
        for k, v in (tensorizer_args.stream_kwargs or {}).items()
        if k not in credentials and v is not None
    }
    values["deserialization_kwargs"] = {
        k: v
        for k, v in (tensorizer_args.deserialization_kwargs or {}).items()
        if k not in ("verify_hash", "num_readers", "encryption") and v is not None
    }
    return TensorizerArgs(as_tensorizer_config(values))


def __getattr__(name: str) -> Any:
    if name in TENSORIZER_NAMES:
        import importlib

        return getattr(importlib.import_module(TENSORIZER_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
