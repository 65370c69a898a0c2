"""Every flag of every command, in one table.

`FLAGS` holds the argparse keywords a flag has wherever it appears; `COMMANDS` lists, per
command, which flags it takes, in help order, with the help text written for that command and
the argument group it belongs to. `add_flags` turns a command's rows into argparse calls, so a
flag shared by several commands is defined once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import TENSORIZER_CLI_FLAGS

DEFAULT_PROMPT = "Hello, my name is"

# the flags the command line shares with TensorizerArgs.add_cli_args (one definition)
TENSORIZER_FLAGS = {
    f: TENSORIZER_CLI_FLAGS[f]
    for f in ("--num-readers", "--s3-access-key-id", "--s3-secret-access-key", "--s3-endpoint")
}


def json_object(flag: str) -> Callable[[str], dict[str, Any]]:
    """An argparse ``type=`` that parses a JSON object; argparse names `flag` in its error."""

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


# flag -> the argparse keywords it has in every command (help and group come from COMMANDS)
FLAGS: dict[str, dict[str, Any]] = {
    "uri": {},
    "--serialized-directory": {"type": str, "default": None},
    "--suffix": {"type": str, "default": None},
    "--keyfile": {"type": str, "default": None},
    "--serialization-kwargs": {
        "type": json_object("--serialization-kwargs"),
        "default": None,
    },
    "--deserialization-kwargs": {
        "type": json_object("--deserialization-kwargs"),
        "default": None,
    },
    "--lora-path": {"dest": "lora_paths", "action": "append", "default": [], "metavar": "PATH"},
    "--path-to-tensors": {"type": str, "default": None},
    "--prompt": {"type": str, "default": DEFAULT_PROMPT},
    "--max-tokens": {"type": int, "default": 16},
    "--json": {"action": "store_true"},
    "--model": {"type": str},
    "--dtype": {"type": str, "default": "auto"},
    "--revision": {"type": str, "default": None},
    "--download-dir": {"type": str, "default": None},
    # --num-readers and the S3 flags: as TensorizerArgs.add_cli_args defines them
    **{f: {k: v for k, v in kw.items() if k != "help"} for f, kw in TENSORIZER_FLAGS.items()},
    "--ca-bundle": {"type": str, "default": None},
    "--allow-http": {"action": "store_true", "default": None},
}


@dataclass(frozen=True)
class Row:
    """One flag of one command: its help there, its group, and keywords only it has."""

    flag: str
    help: str
    group: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


REMOTE = "remote storage"
TENSORIZER = "tensorizer options"  # the group TensorizerArgs.add_cli_args adds

TRANSPORT_HELP = {
    "--ca-bundle": "A PEM file of CA certificates to trust for HTTPS (an S3 endpoint or an "
    "https:// URL whose certificate comes from a private CA).",
    "--allow-http": "Allow a plain http:// S3 endpoint (credentials and data travel "
    'unencrypted). The same as {"stream_kwargs": {"force_http": true}}.',
}
REMOTE_HELP = {
    **{f: TENSORIZER_FLAGS[f]["help"] for f in TENSORIZER_FLAGS if f.startswith("--s3-")},
    **TRANSPORT_HELP,
}


def _rows(helps: Mapping[str, str], group: str) -> tuple[Row, ...]:
    return tuple(Row(flag, text, group) for flag, text in helps.items())


def _file_rows(command: str) -> tuple[Row, ...]:
    keyfile = "The key of an encrypted file" + (
        " (not needed to list it)." if command == "inspect" else "."
    )
    own: tuple[Row, ...] = (
        (Row("--json", "Print one JSON document instead of a table."),)
        if command == "inspect"
        else (
            Row("--json", "Print one JSON document (every file, each bad tensor) instead."),
            Row("--num-readers", TENSORIZER_FLAGS["--num-readers"]["help"]),
        )
    )
    uri = Row(
        "uri",
        "A tensors file (a local path, s3:// or http(s):// URI), a rank template such as "
        "model-rank-%%03d.tensors (every shard), or a model directory written by serialize "
        "or convert (its files found as a load finds them).",
    )
    return (uri, Row("--keyfile", keyfile), *own, *_rows(REMOTE_HELP, REMOTE))


# serialize and convert take --keyfile with the same rules (keys.prepare_key)
KEYFILE = Row(
    "--keyfile",
    "Encrypt the weights. A path (or s3://, gs://, az:// URI) that holds a key: encrypt "
    "with that "
    "key (the file is never overwritten). A path with no file: generate a random key and "
    "save it there (mode 0600).",
)

SERIALIZE = (
    Row(
        "--suffix",
        "The last directory of the destination, e.g. with --serialized-directory "
        "s3://my-bucket and --suffix v1 the tensors go to "
        "s3://my-bucket/vllm/<model>/v1/model.tensors. Default: a random UUID.",
    ),
    Row(
        "--serialized-directory",
        "Where to serialize to: a local directory, s3://bucket[/prefix], "
        "gs://bucket[/prefix] or az://container[/prefix]. Files go to "
        "DIR/vllm/<model>/<suffix>/: <model> is --model for a Hub id or relative path, and "
        "the last path component for an absolute local path.",
        extra={"required": True},
    ),
    KEYFILE,
    Row(
        "--serialization-kwargs",
        "A JSON object of extra arguments for tensorizer's TensorSerializer, e.g. "
        "'{\"limit_cpu_concurrency\": 2}'.",
    ),
    Row(
        "--lora-path",
        "A LoRA adapter (a local PEFT directory, or a Hub id where a Hub is reachable) "
        "to write beside the model, in lora/<name>/ (encrypted with the model's key). May "
        "be given several times; checked against the model before anything is written.",
    ),
    *_rows(REMOTE_HELP, REMOTE),
)

DESERIALIZE = (
    Row(
        "--path-to-tensors",
        "The local path or S3/HTTP(S) URI of the tensors (a rank template such as "
        "model-rank-%%03d.tensors for a sharded model). Same as --tensorizer-uri.",
    ),
    Row(
        "--serialized-directory",
        "A model directory written by serialize or convert (local, s3:// or http(s)://): "
        "its model-rank-%%03d.tensors with several ranks, else its model.tensors (a "
        "convert output is read by every rank) and, unless --model is given, its config "
        "and tokenizer. Instead of --path-to-tensors.",
    ),
    Row(
        "--deserialization-kwargs",
        "A JSON object of extra arguments for tensorizer's TensorDeserializer, e.g. "
        "'{\"verify_hash\": true}' (device, dtype and mode are vLLM's to decide).",
    ),
    Row(
        "--keyfile",
        "The key that decrypts the weights, if they were serialized with encryption. "
        "Same as --encryption-keyfile.",
    ),
    Row("--prompt", "The prompt to generate from (default: %(default)r)."),
    Row("--max-tokens", "How many tokens to generate (default: %(default)s)."),
    *_rows(TRANSPORT_HELP, TENSORIZER),
)

# the engine parser's own flag before the command (serialize's --lora-path may come there too)
ENGINE_TOP = (
    Row(
        "--lora-path",
        "A LoRA adapter to serialize with the model (see serialize --lora-path).",
        extra={"dest": "lora_paths_before"},
    ),
)

# convert's model flags come before the command, its other flags after it
CONVERT_MODEL = (
    Row(
        "--model",
        "A local checkpoint directory, or a Hub id where a Hub is reachable.",
        extra={"required": True},
    ),
    Row("--dtype", "Cast floating-point weights to this dtype (default: keep them)."),
    Row("--revision", "The Hub revision (branch, tag or commit) of a Hub id."),
    Row("--download-dir", "Where the Hub's files are cached."),
)
CONVERT = (
    Row(
        "--serialized-directory",
        "A local directory, s3://bucket[/prefix], gs://bucket[/prefix] or az://container[/prefix].",
        extra={"required": True},
    ),
    Row("--suffix", "The last directory of the destination (default: a random UUID)."),
    KEYFILE,
    Row(
        "--serialization-kwargs",
        "A JSON object of extra arguments for tensorizer's TensorSerializer.",
    ),
    *_rows(REMOTE_HELP, REMOTE),
)

COMMANDS: dict[str, tuple[Row, ...]] = {
    "serialize": SERIALIZE,
    "deserialize": DESERIALIZE,
    "inspect": _file_rows("inspect"),
    "verify": _file_rows("verify"),
    "convert": CONVERT,
}


def add_flags(
    parser: argparse.ArgumentParser,
    rows: tuple[Row, ...],
    groups: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add `rows` to `parser`, each in its group (made on first use unless in `groups`).

    `overrides` maps a flag to keywords this call adds (e.g. ``choices`` known only at run
    time).
    """
    overrides = overrides or {}
    groups = dict(groups or {})
    for row in rows:
        target: Any = parser
        if row.group is not None:
            if row.group not in groups:
                groups[row.group] = parser.add_argument_group(row.group)
            target = groups[row.group]
        keywords = {**FLAGS[row.flag], **row.extra, **overrides.get(row.flag, {}), "help": row.help}
        target.add_argument(row.flag, **keywords)
