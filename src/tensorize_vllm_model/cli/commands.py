"""The commands: parsed flags in, work done by the package, exit code out.

Errors are raised, not printed: `entry.main` turns them into one line and an exit code.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

from .. import storage
from ..config import TensorizerConfig
from ..config.plan import ReadPlan, check_model_directory, model_directory_tensors, resolve_read
from ..core.errors import ConfigError, StorageError
from ..format.keys import read_key
from ..format.names import serialized_dir
from ..format.record import ParallelLayout
from .configs import credentials_to_environment, deserialize_config, read_config, serialize_config
from .output import print_report, print_verified, print_written
from .parsers import PROG


def inspect_or_verify(command: str, args: argparse.Namespace) -> int:
    """``inspect`` (0) or ``verify`` (0 if every file is intact, else 1)."""
    from ..inspection.reports import inspect_tensors, verify_tensors

    config = read_config(args, {"tensorizer_uri": args.uri}, args.keyfile)
    if command == "inspect":
        reports = inspect_tensors(args.uri, config)
        if args.json:
            print(json.dumps({"files": [r.to_json() for r in reports]}, indent=2))
        else:
            for report in reports:
                print_report(report)
        return 0
    results = verify_tensors(args.uri, config)
    if args.json:
        print(json.dumps({"files": [r.to_json() for r in results]}, indent=2))
    else:
        print_verified(results)
    return 0 if all(r.intact for r in results) else 1


def holds_a_model(directory: str, config: TensorizerConfig) -> bool:
    """Whether `directory` already holds a serialized model (its tensors or config), which
    a serialize or convert to it replaces (said as ``replaced``)."""
    options = config.options
    names = ("model.tensors", "model-rank-000.tensors", "config.json")
    try:
        return any(storage.exists(storage.join(directory, name), options) for name in names)
    except StorageError:  # the write names the problem (its checks come before any write)
        return False


def announce_existing_key(keyfile: str | None, config: TensorizerConfig) -> None:
    """Print ``encrypting with the existing key in KEYFILE`` when --keyfile already holds a
    key (it is used and left unchanged), after checking that it is one.

    Raises:
        EncryptionError: the path exists but is not a readable 32-byte key (a directory, say).
    """
    if keyfile and storage.exists(keyfile, config.options):
        read_key(keyfile, config)
        print(f"encrypting with the existing key in {keyfile}", flush=True)


def convert(args: argparse.Namespace) -> int:
    """``convert``: a Hugging Face checkpoint to one tensorizer file, without vLLM."""
    from ..convert import convert_checkpoint

    config = read_config(args, {"tensorizer_uri": "model.tensors"}, None)
    announce_existing_key(args.keyfile, config)
    suffix = args.suffix or uuid.uuid4().hex
    replaced = holds_a_model(serialized_dir(args.serialized_directory, args.model, suffix), config)
    result = convert_checkpoint(
        args.model,
        args.serialized_directory,
        suffix=suffix,
        dtype=args.dtype,
        revision=args.revision,
        keyfile=args.keyfile,
        serialization_kwargs=args.serialization_kwargs,
        config=config,
        download_dir=args.download_dir,
    )
    rate = result.bytes / result.seconds / 1e9 if result.seconds > 0 else 0.0
    print(
        f"Converted {result.tensors} tensors ({result.bytes / 1e6:.1f} MB) in "
        f"{result.seconds:.1f} s ({rate:.2f} GB/s) to {result.directory}"
    )
    print_written(result, replaced=replaced)
    return 0


def serialize(args: argparse.Namespace) -> int:
    """``serialize``: load --model with vLLM and publish its tensors and artifacts."""
    from ..integrations.vllm.engine import check_checkpoint_pieces, engine_args_from_namespace
    from ..integrations.vllm.serialize import tensorize_vllm_model

    engine_args = engine_args_from_namespace(args)
    check_checkpoint_pieces(engine_args.model)  # before vLLM starts: one line, not vLLM's
    config = serialize_config(args)
    engine_args.model_loader_extra_config = {}
    lora_paths = list(args.lora_paths)  # given before the command, then after it
    announce_existing_key(config.encryption_keyfile, config)
    replaced = holds_a_model(config.tensorizer_dir or "", config)
    result = tensorize_vllm_model(engine_args, config, lora_paths=lora_paths)
    print(
        f"Serialized {result.tensors} tensors ({result.bytes / 1e6:.1f} MB) in "
        f"{result.seconds:.1f} s to {result.directory}"
    )
    print_written(result, replaced=replaced)
    return 0


def deserialize(args: argparse.Namespace) -> int:
    """``deserialize``: load the tensors into a vLLM engine, generate, print the load time.

    Every rank's file is checked before any engine work, by the plug-in's engine hook, as
    for any ``LLM(..., load_format="tensorizer")``."""
    config = deserialize_config(args)
    check_model_directory(config)
    directory = args.serialized_directory or (
        config.given_uri
        if config.given_uri and model_directory_tensors(config.given_uri, config.options)
        else None
    )
    if directory and not getattr(args, "model_given", False):
        args.model = directory  # its config and tokenizer too
    known = bool(directory or getattr(args, "model_given", False))
    source, engine, ready = _start_engine(args, config, model_known=known)
    with engine:
        stats = engine.load_stats()
        [(text, _)] = engine.generate([args.prompt], max_tokens=args.max_tokens)
    if stats:
        nbytes = sum(s.bytes for s in stats)
        seconds = max(s.seconds for s in stats)
        rate = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
        print(
            f"Deserialized {nbytes / 1e6:.1f} MB from {source.file_config().tensorizer_uri} in "
            f"{seconds:.2f} s ({rate:.2f} GB/s) on {len(stats)} rank(s); engine ready in "
            f"{ready:.1f} s"
        )
    print(checked_text(config, source))
    print(f"Prompt: {args.prompt!r}")
    print(f"Generated: {text!r}")
    return 0


def _start_engine(
    args: argparse.Namespace, config: TensorizerConfig, *, model_known: bool
) -> tuple[ReadPlan, Any, float]:
    """The read plan, the started `Engine` and the seconds it took to be ready. A model
    vLLM cannot find, when --model was not given (`model_known` false), says that
    --path-to-tensors takes its config and tokenizer from --model."""
    from ..integrations.vllm.engine import Engine, engine_args_from_namespace, parallel_sizes
    from ..integrations.vllm.messages import LOAD_FORMAT, WORKER_EXTENSION

    try:
        engine_args = engine_args_from_namespace(args)
    except ConfigError as e:
        raise (e if model_known else _without_model(e)) from None
    source = resolve_read(config, ParallelLayout(*parallel_sizes(engine_args)))
    start = time.perf_counter()
    try:
        engine = Engine(
            engine_args,
            load_format=LOAD_FORMAT,
            model_loader_extra_config=credentials_to_environment(config),
            worker_extension_cls=WORKER_EXTENSION,
        )
    except ConfigError as e:
        raise (e if model_known else _without_model(e)) from None
    return source, engine, time.perf_counter() - start


def _without_model(error: ConfigError) -> ConfigError:
    """`error`, when no --model was given with --path-to-tensors: vLLM's default model was
    tried; say where the config and tokenizer come from."""
    return ConfigError(
        f"{error} (--path-to-tensors loads the model's config and tokenizer from --model, "
        f"not given: give it before the command, {PROG} --model DIR deserialize "
        "--path-to-tensors URI, or give --serialized-directory DIR instead)"
    )


def checked_text(config: TensorizerConfig, source: ReadPlan) -> str:
    """What a deserialize checked, on one line: the files' format and layout (always, by
    the engine hook), the decryption, and the hashes (with --verify-hash)."""
    files = len(source.rank_uris())
    checked = [
        f"{files} file{'s' if files > 1 else ''} checked: tensorizer format, "
        + (
            "one file every rank reads (whole weights)"
            if source.shared
            else f"written for {source.layout.describe()}"
        )
    ]
    if config.encryption_keyfile:
        checked.append(f"decrypted with the key in {config.encryption_keyfile}")
    deserialization = config.deserialization_kwargs or {}
    if config.verify_hash or deserialization.get("verify_hash"):
        checked.append("every tensor's hash checked while loading (--verify-hash)")
    else:
        checked.append("hashes not checked (add --verify-hash, or run verify)")
    return "; ".join(checked)
