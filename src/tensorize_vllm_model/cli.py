"""The command line, faithful to vLLM's example script ``tensorize_vllm_model.py``.

    python -m tensorize_vllm_model [vLLM engine flags] serialize \
        --serialized-directory DIR [--suffix S] [--keyfile K] [--serialization-kwargs JSON]
    python -m tensorize_vllm_model [vLLM engine flags] deserialize \
        (--serialized-directory DIR | --path-to-tensors URI) [--keyfile K] \
        [--deserialization-kwargs JSON] [tensorizer options]
    python -m tensorize_vllm_model --model SRC [--dtype D] [--revision R] convert \
        --serialized-directory DIR [--suffix S] [--keyfile K] [--serialization-kwargs JSON]

`main(argv)` returns the exit code: 0 on success, 2 for bad input (a one-line
``error: ...`` on stderr naming the flag, file or key at fault, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from . import interrupts, storage
from .config import TensorizerArgs, TensorizerConfig
from .errors import ConfigError, TensorizeError
from .layout import serialized_dir, tensors_uri

DEFAULT_PROMPT = "Hello, my name is"

DESCRIPTION = (
    "Serialize and deserialize vLLM models with CoreWeave's tensorizer. Serialized models "
    "load extremely quickly onto the GPU (or the CPU backend) from a local path, an "
    "HTTP(S) endpoint or S3. Tensor encryption is supported (libsodium)."
)


def _json_object(flag: str):
    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
        return value

    parse.__name__ = flag
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The parser: every vLLM engine flag, then the serialize/deserialize subcommands."""
    from .vllm_adapter import make_parser

    parser = make_parser(prog="python -m tensorize_vllm_model", description=DESCRIPTION)
    parser.add_argument(
        "--lora-path",
        dest="lora_paths_before",
        action="append",
        default=[],
        metavar="PATH",
        help="A LoRA adapter to serialize with the model (see serialize --lora-path).",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="{serialize,deserialize,inspect,verify}"
    )
    for name, text in FILE_COMMANDS.items():
        subparsers.add_parser(name, help=text, add_help=False)  # listed; parsed without vLLM

    serialize = subparsers.add_parser(
        "serialize",
        help="Serialize a model to --serialized-directory",
        description="Load --model with vLLM and write its tensors, config and tokenizer to "
        "DIR/vllm/<model>/<suffix>/.",
    )
    serialize.add_argument(
        "--suffix",
        type=str,
        default=None,
        help="The last directory of the destination, e.g. with --serialized-directory "
        "s3://my-bucket and --suffix v1 the tensors go to "
        "s3://my-bucket/vllm/<model>/v1/model.tensors. Default: a random UUID.",
    )
    serialize.add_argument(
        "--serialized-directory",
        type=str,
        required=True,
        help="Where to serialize to: a local directory or s3://bucket[/prefix]. Files go to "
        "DIR/vllm/<model>/<suffix>/: <model> is --model for a Hub id or relative path, and "
        "the last path component for an absolute local path.",
    )
    serialize.add_argument(
        "--keyfile",
        type=str,
        default=None,
        help="Encrypt the weights. A path (or s3:// URI) that holds a key: encrypt with that "
        "key (the file is never overwritten). A path with no file: generate a random key and "
        "save it there (mode 0600).",
    )
    serialize.add_argument(
        "--serialization-kwargs",
        type=_json_object("--serialization-kwargs"),
        default=None,
        help="A JSON object of extra arguments for tensorizer's TensorSerializer, e.g. "
        "'{\"limit_cpu_concurrency\": 2}'.",
    )
    serialize.add_argument(
        "--lora-path",
        dest="lora_paths",
        action="append",
        default=[],
        metavar="PATH",
        help="A LoRA adapter (a local PEFT directory, or a Hub id where a Hub is reachable) "
        "to write beside the model, in lora/<name>/ (encrypted with the model's key). May "
        "be given several times; checked against the model before anything is written.",
    )
    _add_remote_flags(serialize.add_argument_group("remote storage"))

    deserialize = subparsers.add_parser(
        "deserialize",
        help="Deserialize a model from --path-to-tensors to verify it can be loaded and used",
        description="Load the tensors into vLLM, generate from a prompt, print the load time.",
    )
    deserialize.add_argument(
        "--path-to-tensors",
        type=str,
        default=None,
        help="The local path or S3/HTTP(S) URI of the tensors (a rank template such as "
        "model-rank-%%03d.tensors for a sharded model). Same as --tensorizer-uri.",
    )
    deserialize.add_argument(
        "--serialized-directory",
        type=str,
        default=None,
        help="A model directory written by serialize (local, s3:// or http(s)://): its "
        "model.tensors (model-rank-%%03d.tensors with several ranks) and, unless --model "
        "is given, its config and tokenizer. Instead of --path-to-tensors.",
    )
    deserialize.add_argument(
        "--deserialization-kwargs",
        type=_json_object("--deserialization-kwargs"),
        default=None,
        help="A JSON object of extra arguments for tensorizer's TensorDeserializer, e.g. "
        "'{\"verify_hash\": true}' (device, dtype and mode are vLLM's to decide).",
    )
    deserialize.add_argument(
        "--keyfile",
        type=str,
        default=None,
        help="The key that decrypts the weights, if they were serialized with encryption. "
        "Same as --encryption-keyfile.",
    )
    deserialize.add_argument(
        "--prompt",
        type=str,
        default=DEFAULT_PROMPT,
        help="The prompt to generate from (default: %(default)r).",
    )
    deserialize.add_argument(
        "--max-tokens",
        type=int,
        default=16,
        help="How many tokens to generate (default: %(default)s).",
    )
    group = TensorizerArgs.add_cli_args(deserialize)._action_groups[-1]
    _add_transport_flags(group)
    return parser


FILE_COMMANDS = {
    "inspect": "List the tensors, layout and encryption of a tensors file (no vLLM)",
    "verify": "Read every tensor, check its hash and key; exit 0 only if all are intact",
}


def build_file_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``inspect`` and ``verify``: they need neither vLLM nor its flags."""
    parser = argparse.ArgumentParser(
        prog=f"python -m tensorize_vllm_model {command}", description=FILE_COMMANDS[command]
    )
    parser.add_argument(
        "uri",
        help="A local path, s3:// or http(s):// URI, or a rank "
        "template such as model-rank-%%03d.tensors (every shard).",
    )
    parser.add_argument(
        "--keyfile",
        type=str,
        default=None,
        help="The key of an encrypted file"
        + (" (not needed to list it)." if command == "inspect" else "."),
    )
    if command == "inspect":
        parser.add_argument(
            "--json", action="store_true", help="Print one JSON document instead of a table."
        )
    else:
        parser.add_argument(
            "--num-readers",
            type=int,
            default=None,
            help="Parallel readers (default: chosen for the source).",
        )
    _add_remote_flags(parser.add_argument_group("remote storage"))
    return parser


def _add_remote_flags(group) -> None:
    """S3 credentials and endpoint, then the transport flags."""
    group.add_argument(
        "--s3-access-key-id",
        type=str,
        default=None,
        help="The S3 access key (else S3_ACCESS_KEY_ID, the AWS chain, ~/.s3cfg).",
    )
    group.add_argument(
        "--s3-secret-access-key",
        type=str,
        default=None,
        help="The S3 secret key. Prefer the S3_SECRET_ACCESS_KEY environment "
        "variable: command lines are visible to other users.",
    )
    group.add_argument(
        "--s3-endpoint", type=str, default=None, help="The S3 endpoint URL (else S3_ENDPOINT_URL)."
    )
    _add_transport_flags(group)


def _file_command(argv: list[str]) -> int:
    from .inspection import inspect_tensors, verify_tensors

    command, rest = argv[0], argv[1:]
    args = build_file_parser(command).parse_args(rest)
    try:
        config = _read_config(args, {"tensorizer_uri": args.uri}, args.keyfile)
        if command == "inspect":
            reports = inspect_tensors(args.uri, config)
            if args.json:
                print(json.dumps({"files": [r.to_json() for r in reports]}, indent=2))
            else:
                for report in reports:
                    _print_report(report)
            return 0
        results = verify_tensors(args.uri, config)
    except TensorizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for result in results:
        if result.intact:
            print(
                f"OK {result.uri}: {result.tensors} tensors, {result.bytes / 1e6:.1f} MB, "
                f"hashes checked in {result.seconds:.2f} s"
            )
        else:
            print(f"BAD {result.uri}: {len(result.bad)} of {result.tensors} tensors corrupt")
            for name, reason in result.bad:
                print(f"  {name}: {reason}")
    return 0 if all(r.intact for r in results) else 1


CONVERT_DESCRIPTION = (
    "Convert a Hugging Face checkpoint (safetensors or .bin) into one tensorizer file that "
    "loads at any tensor/pipeline-parallel layout, each rank reading only its share. Needs "
    "neither vLLM nor a GPU. Writes DIR/vllm/<model>/<suffix>/ as serialize does."
)


def build_convert_parser() -> argparse.ArgumentParser:
    """The parser of ``convert``: a few model flags before the command, no vLLM."""
    from .convert.writer import DTYPES

    parser = argparse.ArgumentParser(
        prog="python -m tensorize_vllm_model", description=CONVERT_DESCRIPTION
    )
    parser.add_argument(
        "--model",
        type=str,
        required=True,
        help="A local checkpoint directory, or a Hub id where a Hub is reachable.",
    )
    parser.add_argument(
        "--dtype",
        type=str,
        default="auto",
        choices=DTYPES,
        help="Cast floating-point weights to this dtype (default: keep them).",
    )
    parser.add_argument(
        "--revision",
        type=str,
        default=None,
        help="The Hub revision (branch, tag or commit) of a Hub id.",
    )
    parser.add_argument(
        "--download-dir", type=str, default=None, help="Where the Hub's files are cached."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{convert}")
    convert = subparsers.add_parser(
        "convert", help=CONVERT_DESCRIPTION, description=CONVERT_DESCRIPTION
    )
    convert.add_argument(
        "--serialized-directory",
        type=str,
        required=True,
        help="A local directory or s3://bucket[/prefix].",
    )
    convert.add_argument(
        "--suffix",
        type=str,
        default=None,
        help="The last directory of the destination (default: a random UUID).",
    )
    convert.add_argument(
        "--keyfile",
        type=str,
        default=None,
        help="Encrypt with a randomly generated key saved here (mode 0600) or at this s3:// URI.",
    )
    convert.add_argument(
        "--serialization-kwargs",
        type=_json_object("--serialization-kwargs"),
        default=None,
        help="A JSON object of extra arguments for tensorizer's TensorSerializer.",
    )
    _add_remote_flags(convert.add_argument_group("remote storage"))
    return parser


def _convert(argv: list[str]) -> int:
    from .convert import convert_checkpoint

    args = build_convert_parser().parse_args(argv)
    try:
        _check_model_path(args.model)
        config = _read_config(args, {"tensorizer_uri": "model.tensors"}, None)
        if args.keyfile and storage.exists(args.keyfile, config.stream_options()):
            print(f"encrypting with the existing key in {args.keyfile}", flush=True)
        result = convert_checkpoint(
            args.model,
            args.serialized_directory,
            suffix=args.suffix or uuid.uuid4().hex,
            dtype=args.dtype,
            revision=args.revision,
            keyfile=args.keyfile,
            serialization_kwargs=args.serialization_kwargs,
            config=config,
            download_dir=args.download_dir,
        )
    except TensorizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = result.bytes / result.seconds / 1e9 if result.seconds > 0 else 0.0
    print(
        f"Converted {result.tensors} tensors ({result.bytes / 1e6:.1f} MB) in "
        f"{result.seconds:.1f} s ({rate:.2f} GB/s) to {result.directory}"
    )
    _print_written(result)
    return 0


def _print_written(result: Any) -> None:
    """The files a serialize or convert published, its key, and (last line) its directory."""
    for uri in result.files:
        print(f"  wrote {uri}")
    if result.keyfile and result.key_existing:
        print(f"  encrypted with the existing key in {result.keyfile} (left unchanged)")
    elif result.keyfile:
        print(f"  key saved to {result.keyfile} (mode 0600): keep it to load the model")
    print(result.directory)


def _print_report(report: Any) -> None:
    record = report.record or {}
    extra = record.get("extra") or {}
    if extra.get("form") == "checkpoint":
        layout = (
            f"any (checkpoint form, written by convert; dtype {record.get('dtype')}; "
            f"{len(extra.get('transposed') or [])} row-parallel weights stored "
            "transposed)"
        )
    elif record:
        layout = (
            f"TP={record['tensor_parallel_size']} x PP={record['pipeline_parallel_size']}"
            f", rank {record['rank']}"
        )
    elif report.encrypted and report.vllm_tensorized:
        layout = "unknown (the file's record is encrypted: give --keyfile)"
    else:
        layout = "not recorded"
    print(f"{report.uri}")
    print(
        f"  tensorizer format version {report.format_version}; "
        f"{'encrypted' if report.encrypted else 'not encrypted'}; "
        f"{'vLLM-tensorized' if report.vllm_tensorized else 'not vLLM-tensorized'}"
    )
    print(
        f"  parallel layout: {layout}"
        + (f"; architecture {record['architecture']}" if record.get("architecture") else "")
        + (f"; written by {record['producer']}" if record.get("producer") else "")
    )
    width = max((len(t.name) for t in report.tensors), default=4)
    print(f"  {'name':<{width}}  {'dtype':<9} {'shape':<18} {'bytes':>12}")
    for t in report.tensors:
        shape = "x".join(str(d) for d in t.shape) or "scalar"
        print(f"  {t.name:<{width}}  {t.dtype:<9} {shape:<18} {t.bytes:>12}")
    print(
        f"  {len(report.tensors)} tensors, {report.tensor_bytes} bytes "
        f"({report.tensor_bytes / 1e9:.3f} GB) in a {report.size}-byte file"
    )


def _add_transport_flags(group) -> None:
    group.add_argument(
        "--ca-bundle",
        type=str,
        default=None,
        help="A PEM file of CA certificates to trust for HTTPS (an S3 endpoint or an "
        "https:// URL whose certificate comes from a private CA).",
    )
    group.add_argument(
        "--allow-http",
        action="store_true",
        default=None,
        help="Allow a plain http:// S3 endpoint (credentials and data travel unencrypted). "
        'The same as {"stream_kwargs": {"force_http": true}}.',
    )


def _transport(args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Config values for --ca-bundle and --allow-http on top of the extra config."""
    values: dict[str, Any] = {}
    if getattr(args, "ca_bundle", None):
        values["ca_bundle"] = args.ca_bundle
    if getattr(args, "allow_http", None):
        values["stream_kwargs"] = {**(extra.get("stream_kwargs") or {}), "force_http": True}
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); return the exit code.

    Ctrl-C (SIGINT) or SIGTERM at any moment cleans up, prints one ``interrupted`` line and
    returns 130 or 143 (see `interrupts`)."""
    interrupts.install()
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except interrupts.Interrupted as e:
        print(f"interrupted ({e})", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:  # raised before the handler was installed, or by other code
        print("interrupted (SIGINT)", file=sys.stderr, flush=True)
        return 128 + 2


def _run(argv: list[str]) -> int:
    if argv and argv[0] in FILE_COMMANDS:
        return _file_command(argv)
    if "convert" in argv:
        return _convert(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model_given = any(a == "--model" or a.startswith("--model=") for a in argv)
    if args.command is None:
        parser.error("a command is required: serialize, deserialize, inspect or verify")
    try:
        _check_model_path(args.model)
        if args.command == "serialize":
            return _serialize(args)
        return _deserialize(args, parser)
    except TensorizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_model_path(model: str | None) -> None:
    """A --model that is plainly a local path (absolute, or starting with a dot) must exist;
    anything else may be a Hub id."""
    if model and (os.path.isabs(model) or model.startswith(".")) and not os.path.exists(model):
        raise ConfigError(f"--model {model}: no such directory")


def _extra_config(args: argparse.Namespace) -> dict[str, Any]:
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


def serialize_config(args: argparse.Namespace, world_size: int) -> TensorizerConfig:
    """The config of a ``serialize``: the destination from --serialized-directory, --model
    and --suffix; keys and transport from the flags, then --model-loader-extra-config."""
    extra = _extra_config(args)
    directory = serialized_dir(
        args.serialized_directory, args.model, args.suffix or uuid.uuid4().hex
    )
    values = {
        "stream_kwargs": extra.get("stream_kwargs"),
        "ca_bundle": extra.get("ca_bundle"),
        **{
            k: extra[k]
            for k in ("s3_access_key_id", "s3_secret_access_key", "s3_endpoint")
            if k in extra
        },
        **{
            k: getattr(args, k)
            for k in ("s3_access_key_id", "s3_secret_access_key", "s3_endpoint")
            if getattr(args, k, None) is not None
        },
        **_transport(args, extra),
    }
    return TensorizerConfig(
        tensorizer_uri=tensors_uri(directory, world_size),
        encryption_keyfile=args.keyfile,
        serialization_kwargs=args.serialization_kwargs or extra.get("serialization_kwargs"),
        **values,
    )


def _serialize(args: argparse.Namespace) -> int:
    from .serialization import tensorize_vllm_model
    from .vllm_adapter import engine_args_from_namespace, parallel_sizes

    engine_args = engine_args_from_namespace(args)
    tp, pp = parallel_sizes(engine_args)
    config = serialize_config(args, tp * pp)
    engine_args.model_loader_extra_config = {}
    lora_paths = [*args.lora_paths_before, *args.lora_paths]
    if config.encryption_keyfile and storage.exists(
        config.encryption_keyfile, config.stream_options()
    ):
        print(f"encrypting with the existing key in {config.encryption_keyfile}", flush=True)
    result = tensorize_vllm_model(engine_args, config, lora_paths=lora_paths)
    print(
        f"Serialized {result.tensors} tensors ({result.bytes / 1e6:.1f} MB) in "
        f"{result.seconds:.1f} s to {result.directory}"
    )
    _print_written(result)
    return 0


def deserialize_config(args: argparse.Namespace) -> TensorizerConfig:
    """The config of a ``deserialize``: --model-loader-extra-config, then the flags.

    The tensors are --path-to-tensors (or --tensorizer-uri), or the files of
    --serialized-directory: ``model.tensors``, or ``model-rank-%03d.tensors`` when the
    engine has several ranks (as `serialize` names them).
    """
    uri = args.path_to_tensors or args.tensorizer_uri
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
    if args.path_to_tensors and args.tensorizer_uri and args.path_to_tensors != args.tensorizer_uri:
        raise ConfigError("--path-to-tensors and --tensorizer-uri name different files; give one")
    if args.keyfile and args.encryption_keyfile and args.keyfile != args.encryption_keyfile:
        raise ConfigError("--keyfile and --encryption-keyfile name different files; give one")
    if directory:
        world = int(getattr(args, "tensor_parallel_size", 1) or 1) * int(
            getattr(args, "pipeline_parallel_size", 1) or 1
        )
        uri = tensors_uri(directory.rstrip("/") or "/", world)
    values = {**_extra_config(args), "tensorizer_uri": uri}
    if getattr(args, "deserialization_kwargs", None) is not None:
        values["deserialization_kwargs"] = {
            **(values.get("deserialization_kwargs") or {}),
            **args.deserialization_kwargs,
        }
    return _read_config(args, values, args.keyfile or args.encryption_keyfile)


def _read_config(
    args: argparse.Namespace, values: dict[str, Any], keyfile: str | None
) -> TensorizerConfig:
    """The config of a read: `values`, then the read flags given (each command has some of
    them), the key, and the transport flags."""
    for name in (
        "verify_hash",
        "num_readers",
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_endpoint",
        "ca_bundle",
    ):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if keyfile:
        values["encryption_keyfile"] = keyfile
    values.update(_transport(args, values))
    return TensorizerConfig.from_extra_config(values)


def _credentials_to_environment(config: TensorizerConfig) -> dict[str, Any]:
    """The config for the engine, with the S3 keys moved into this process's environment.

    vLLM logs its engine arguments (the loader's extra config among them); the engine's
    processes inherit the environment instead, so the keys reach them without being logged.
    """
    values = config.to_serializable()
    for field, variable in (
        ("s3_access_key_id", "S3_ACCESS_KEY_ID"),
        ("s3_secret_access_key", "S3_SECRET_ACCESS_KEY"),
    ):
        if field in values:
            os.environ[variable] = values.pop(field)
    return values


def _deserialize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .vllm_adapter import (
        LOAD_FORMAT,
        WORKER_EXTENSION,
        Engine,
        engine_args_from_namespace,
    )

    config = deserialize_config(args)
    if args.serialized_directory and not getattr(args, "model_given", False):
        args.model = args.serialized_directory  # its config and tokenizer too
    engine_args = engine_args_from_namespace(args)
    # Every rank's file is checked before any engine work, by the plug-in's engine hook
    # (vllm_adapter.check_engine_files), as for any LLM(..., load_format="tensorizer").

    start = time.perf_counter()
    with Engine(
        engine_args,
        load_format=LOAD_FORMAT,
        model_loader_extra_config=_credentials_to_environment(config),
        worker_extension_cls=WORKER_EXTENSION,
    ) as engine:
        ready = time.perf_counter() - start
        stats = [s for s in engine.rpc("tensorize_vllm_model_load_stats") if s]
        [(text, _)] = engine.generate([args.prompt], max_tokens=args.max_tokens)
    if stats:
        nbytes = sum(s["bytes"] for s in stats)
        seconds = max(s["seconds"] for s in stats)
        rate = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
        print(
            f"Deserialized {nbytes / 1e6:.1f} MB from {config.tensorizer_uri} in "
            f"{seconds:.2f} s ({rate:.2f} GB/s) on {len(stats)} rank(s); engine ready in "
            f"{ready:.1f} s"
        )
    print(f"Prompt: {args.prompt!r}")
    print(f"Generated: {text!r}")
    return 0
