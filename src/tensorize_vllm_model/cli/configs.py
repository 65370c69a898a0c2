"""From parsed flags to a `TensorizerConfig`: which file, which key, which transport.

Each command's flags and ``--model-loader-extra-config`` are merged here; a conflict or a
malformed value is a `ConfigError` naming the flags at fault.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from typing import Any

from .. import storage
from ..config import TensorizerConfig
from ..core.errors import ConfigError
from ..format.names import serialized_dir

S3_FIELDS = ("s3_access_key_id", "s3_secret_access_key", "s3_endpoint")
READ_FLAGS = ("verify_hash", "num_readers", *S3_FIELDS, "ca_bundle")


def check_model_path(model: str | None) -> None:
    """A --model that is plainly a local path (absolute, or starting with a dot) must exist;
    anything else may be a Hub id."""
    if model and (os.path.isabs(model) or model.startswith(".")) and not os.path.exists(model):
        raise ConfigError(f"--model {model}: no such directory")


def extra_config(args: argparse.Namespace) -> dict[str, Any]:
    """--model-loader-extra-config as a dict, without a nested ``tensorizer_config``."""
    extra = getattr(args, "model_loader_extra_config", None) or {}
    if isinstance(extra, str):  # older vLLM parsers leave it as text
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model-loader-extra-config is not valid JSON ({e})") from None
    if not isinstance(extra, dict):
        raise ConfigError(
            f"--model-loader-extra-config must be a JSON object, got {type(extra).__name__}"
        )
    extra = dict(extra)
    extra.pop("tensorizer_config", None)
    return extra


def transport(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Config values for --ca-bundle and --allow-http on top of the extra config."""
    values: dict[str, Any] = {}
    if getattr(args, "ca_bundle", None):
        values["ca_bundle"] = args.ca_bundle
    if getattr(args, "allow_http", None):
        values["stream_kwargs"] = {**(extra.get("stream_kwargs") or {}), "force_http": True}
    return values


def serialize_config(args: argparse.Namespace) -> TensorizerConfig:
    """The config of a ``serialize``: the destination directory (``tensorizer_dir``) from
    --serialized-directory, --model and --suffix; keys and transport from the flags, then
    --model-loader-extra-config. Which file each rank writes is `plan.resolve_write`'s
    answer (``model.tensors``, or ``model-rank-%03d.tensors`` at more than one rank)."""
    extra = extra_config(args)
    directory = serialized_dir(
        args.serialized_directory, args.model, args.suffix or uuid.uuid4().hex
    )
    values = {
        "stream_kwargs": extra.get("stream_kwargs"),
        "ca_bundle": extra.get("ca_bundle"),
        **{k: extra[k] for k in S3_FIELDS if k in extra},
        **{k: getattr(args, k) for k in S3_FIELDS if getattr(args, k, None) is not None},
        **transport(args, extra),
    }
    return TensorizerConfig(
        tensorizer_dir=directory,
        encryption_keyfile=args.keyfile,
        serialization_kwargs=args.serialization_kwargs or extra.get("serialization_kwargs"),
        **values,
    )


def _check_deserialize_flags(args: argparse.Namespace, uri: str | None) -> None:
    directory = getattr(args, "serialized_directory", None)
    if directory and uri:
        raise ConfigError(
            "--serialized-directory and --path-to-tensors (or --tensorizer-uri) "
            "cannot both be given; give one"
        )
    if not directory and not uri:
        raise ConfigError(
            "deserialize needs --serialized-directory or --path-to-tensors (or --tensorizer-uri)"
        )
    local = storage.local_path(directory) if directory else None
    if local is not None and not os.path.isdir(local):
        what = "not a directory" if os.path.exists(local) else "no such directory"
        raise ConfigError(
            f"--serialized-directory {directory}: {what}; give the directory serialize or "
            "convert printed (or --path-to-tensors for a tensors file)"
        )
    if args.path_to_tensors and args.tensorizer_uri and args.path_to_tensors != args.tensorizer_uri:
        raise ConfigError("--path-to-tensors and --tensorizer-uri name different files; give one")
    if args.keyfile and args.encryption_keyfile and args.keyfile != args.encryption_keyfile:
        raise ConfigError("--keyfile and --encryption-keyfile name different files; give one")


def deserialize_config(args: argparse.Namespace) -> TensorizerConfig:
    """The config of a ``deserialize``: --model-loader-extra-config, then the flags.

    The tensors are --path-to-tensors (or --tensorizer-uri), or --serialized-directory
    (``tensorizer_dir``, as in vLLM's example script): which of its files each rank reads
    is `plan.resolve_read`'s answer (``model-rank-%03d.tensors`` when the directory has rank
    files, else its one ``model.tensors``, shared by every rank).
    """
    uri = args.path_to_tensors or args.tensorizer_uri
    _check_deserialize_flags(args, uri)
    values = extra_config(args)
    directory = getattr(args, "serialized_directory", None)
    if directory:  # the flag wins over the extra config's file
        values.pop("tensorizer_uri", None)
        values["tensorizer_dir"] = directory.rstrip("/") or "/"
    else:
        values["tensorizer_uri"] = uri
    if getattr(args, "deserialization_kwargs", None) is not None:
        values["deserialization_kwargs"] = {
            **(values.get("deserialization_kwargs") or {}),
            **args.deserialization_kwargs,
        }
    return read_config(args, values, args.keyfile or args.encryption_keyfile)


def read_config(
    args: argparse.Namespace, values: dict[str, Any], keyfile: str | None
) -> TensorizerConfig:
    """The config of a read: `values`, then the read flags given (each command has some of
    them), the key, and the transport flags."""
    for name in READ_FLAGS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    readers = getattr(args, "num_readers", None)
    if readers is not None and readers < 1:
        raise ConfigError(f"--num-readers must be a positive integer, got {readers}")
    if keyfile:
        values["encryption_keyfile"] = keyfile
    values.update(transport(args, values))
    return TensorizerConfig.from_extra_config(values)


def credentials_to_environment(config: TensorizerConfig) -> dict[str, Any]:
    """The config for the engine, with the S3 keys moved into this process's environment.

    vLLM logs its engine arguments (the loader's extra config among them); the engine's
    processes inherit the environment instead, so the keys reach them without being logged.
    """
    values = config.to_serializable()
    for name, variable in (
        ("s3_access_key_id", "S3_ACCESS_KEY_ID"),
        ("s3_secret_access_key", "S3_SECRET_ACCESS_KEY"),
    ):
        if name in values:
            os.environ[variable] = values.pop(name)
    return values
