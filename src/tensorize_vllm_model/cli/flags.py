"""Every flag of every command, in one table: `FLAGS`.

Each `Flag` row is a flag's name, its argparse keywords (the same wherever it appears) and,
per place it is taken (`PLACES`: a command, or the flags before one), its help there and
its group. `add_flags(parser, place)` adds a place's flags in table order, so adding a flag,
or offering one to another command, is one edit of one row.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import TENSORIZER_CLI_FLAGS

DEFAULT_PROMPT = "Hello, my name is"

# where flags are taken: after each command, or before one (ENGINE: before serialize and
# deserialize, on vLLM's engine parser; MODEL: convert's model flags, before convert)
ENGINE = "engine"
MODEL = "model"
PLACES = ("serialize", "deserialize", "inspect", "verify", "convert", ENGINE, MODEL)

REMOTE = "remote storage"
TENSORIZER = "tensorizer options"  # the group of TensorizerArgs.add_cli_args (vLLM's script)
GROUP_DESCRIPTIONS = {
    TENSORIZER: "How the tensorizer deserializer reads the tensors. The same settings can be "
    "given as a JSON object to --model-loader-extra-config (vllm serve) or as "
    "TensorizerConfig fields to model_loader_extra_config (LLM).",
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


@dataclass(frozen=True)
class Use:
    """A flag in one place: its help there, its group, and keywords only it has there."""

    help: str
    group: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Flag:
    """One flag: its name, its argparse keywords, and where it is taken (place -> `Use`)."""

    name: str
    keywords: Mapping[str, Any]
    uses: Mapping[str, Use]


def _tensorizer(flag: str) -> dict[str, Any]:
    """A flag's keywords as TensorizerArgs.add_cli_args defines them (one definition)."""
    return {k: v for k, v in TENSORIZER_CLI_FLAGS[flag].items() if k != "help"}


def _tensorizer_help(flag: str) -> str:
    return str(TENSORIZER_CLI_FLAGS[flag]["help"])


def _remote(help: str, deserialize: bool = True) -> dict[str, Use]:
    """The remote-storage flags' uses: their group in every command that writes or reads
    (in deserialize, the tensorizer options group, as in vLLM's script)."""
    uses = {c: Use(help, REMOTE) for c in ("serialize", "inspect", "verify", "convert")}
    return {**uses, "deserialize": Use(help, TENSORIZER)} if deserialize else uses


# serialize and convert take --keyfile with the same rules (keys.prepare_key)
WRITE_KEYFILE = (
    "Encrypt the weights. A path (or s3://, gs://, az:// URI) that holds a key: encrypt "
    "with that key (the file is never overwritten). A path with no file: generate a random "
    "key and save it there (mode 0600)."
)
SERIALIZATION_KWARGS = "A JSON object of extra arguments for tensorizer's TensorSerializer"
LORA_PATH = (
    "A LoRA adapter (a local PEFT directory, or a Hub id where a Hub is reachable) to write "
    "beside the model, in lora/<name>/ (encrypted with the model's key). May be given several "
    "times; checked against the model before anything is written."
)
FILE_URI = (
    "A tensors file (a local path, s3:// or http(s):// URI), a rank template such as "
    "model-rank-%%03d.tensors (every shard), or a model directory written by serialize or "
    "convert (its files found as a load finds them)."
)

FLAGS: tuple[Flag, ...] = (
    Flag("uri", {}, {c: Use(FILE_URI) for c in ("inspect", "verify")}),
    Flag(
        "--model",
        {"type": str},
        {
            MODEL: Use(
                "A local checkpoint directory, or a Hub id where a Hub is reachable.",
                extra={"required": True},
            )
        },
    ),
    Flag(
        "--dtype",
        {"type": str, "default": "auto"},
        {MODEL: Use("Cast floating-point weights to this dtype (default: keep them).")},
    ),
    Flag(
        "--revision",
        {"type": str, "default": None},
        {MODEL: Use("The Hub revision (branch, tag or commit) of a Hub id.")},
    ),
    Flag(
        "--download-dir",
        {"type": str, "default": None},
        {MODEL: Use("Where the Hub's files are cached.")},
    ),
    Flag(
        "--lora-path",
        {"dest": "lora_paths", "action": "append", "default": [], "metavar": "PATH"},
        {
            # vLLM's example script takes it before the command (one list: before, then after)
            ENGINE: Use("A LoRA adapter to serialize with the model (see serialize --lora-path)."),
            "serialize": Use(LORA_PATH),
        },
    ),
    Flag(
        "--path-to-tensors",
        {"type": str, "default": None},
        {
            "deserialize": Use(
                "The local path or S3/HTTP(S) URI of the tensors (a rank template such as "
                "model-rank-%%03d.tensors for a sharded model). Same as --tensorizer-uri."
            )
        },
    ),
    Flag(
        "--serialized-directory",
        {"type": str, "default": None},
        {
            "deserialize": Use(
                "A model directory written by serialize or convert (local, s3:// or "
                "http(s)://): its model-rank-%%03d.tensors with several ranks, else its "
                "model.tensors (a convert output is read by every rank) and, unless --model is "
                "given, its config and tokenizer. Instead of --path-to-tensors."
            ),
            "serialize": Use(
                "Where to serialize to: a local directory, s3://bucket[/prefix], "
                "gs://bucket[/prefix] or az://container[/prefix]. Files go to "
                "DIR/vllm/<model>/<suffix>/: <model> is --model for a Hub id or relative path, "
                "and the last path component for an absolute local path.",
                extra={"required": True},
            ),
            "convert": Use(
                "A local directory, s3://bucket[/prefix], gs://bucket[/prefix] or "
                "az://container[/prefix].",
                extra={"required": True},
            ),
        },
    ),
    Flag(
        "--suffix",
        {"type": str, "default": None},
        {
            "serialize": Use(
                "The last directory of the destination, e.g. with --serialized-directory "
                "s3://my-bucket and --suffix v1 the tensors go to "
                "s3://my-bucket/vllm/<model>/v1/model.tensors. Default: a random UUID."
            ),
            "convert": Use("The last directory of the destination (default: a random UUID)."),
        },
    ),
    Flag(
        "--keyfile",
        {"type": str, "default": None},
        {
            "serialize": Use(WRITE_KEYFILE),
            "convert": Use(WRITE_KEYFILE),
            "deserialize": Use(
                "The key that decrypts the weights, if they were serialized with encryption. "
                "Same as --encryption-keyfile."
            ),
            "inspect": Use("The key of an encrypted file (not needed to list it)."),
            "verify": Use("The key of an encrypted file."),
        },
    ),
    Flag(
        "--serialization-kwargs",
        {"type": json_object("--serialization-kwargs"), "default": None},
        {
            "serialize": Use(f"{SERIALIZATION_KWARGS}, e.g. '{{\"limit_cpu_concurrency\": 2}}'."),
            "convert": Use(f"{SERIALIZATION_KWARGS}."),
        },
    ),
    Flag(
        "--deserialization-kwargs",
        {"type": json_object("--deserialization-kwargs"), "default": None},
        {
            "deserialize": Use(
                "A JSON object of extra arguments for tensorizer's TensorDeserializer, e.g. "
                "'{\"verify_hash\": true}' (device, dtype and mode are vLLM's to decide)."
            )
        },
    ),
    Flag(
        "--prompt",
        {"type": str, "default": DEFAULT_PROMPT},
        {"deserialize": Use("The prompt to generate from (default: %(default)r).")},
    ),
    Flag(
        "--max-tokens",
        {"type": int, "default": 16},
        {"deserialize": Use("How many tokens to generate (default: %(default)s).")},
    ),
    Flag(
        "--json",
        {"action": "store_true"},
        {
            "inspect": Use("Print one JSON document instead of a table."),
            "verify": Use("Print one JSON document (every file, each bad tensor) instead."),
        },
    ),
    # vLLM's example script's tensorizer flags (TensorizerArgs.add_cli_args, one definition)
    *(
        Flag(f, _tensorizer(f), {"deserialize": Use(_tensorizer_help(f), TENSORIZER)})
        for f in ("--tensorizer-uri", "--verify-hash", "--encryption-keyfile")
    ),
    Flag(
        "--num-readers",
        _tensorizer("--num-readers"),
        {
            "deserialize": Use(_tensorizer_help("--num-readers"), TENSORIZER),
            "verify": Use(_tensorizer_help("--num-readers")),
        },
    ),
    *(
        Flag(f, _tensorizer(f), _remote(_tensorizer_help(f)))
        for f in ("--s3-access-key-id", "--s3-secret-access-key", "--s3-endpoint")
    ),
    Flag(
        "--ca-bundle",
        {"type": str, "default": None},
        _remote(
            "A PEM file of CA certificates to trust for HTTPS (an S3 endpoint or an "
            "https:// URL whose certificate comes from a private CA)."
        ),
    ),
    Flag(
        "--allow-http",
        {"action": "store_true", "default": None},
        _remote(
            "Allow a plain http:// S3 endpoint (credentials and data travel unencrypted). "
            'The same as {"stream_kwargs": {"force_http": true}}.'
        ),
    ),
)


def flag_names(place: str) -> tuple[str, ...]:
    """The flags taken at `place` (a command, `ENGINE` or `MODEL`), in table order."""
    return tuple(f.name for f in FLAGS if place in f.uses)


def add_flags(
    parser: argparse.ArgumentParser,
    place: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add `place`'s flags to `parser`, in table order, each in its group (made on first
    use, with its description from `GROUP_DESCRIPTIONS`).

    `overrides` maps a flag to keywords this call adds (e.g. ``choices`` known only at run
    time).
    """
    overrides = overrides or {}
    groups: dict[str, Any] = {}
    for flag in FLAGS:
        use = flag.uses.get(place)
        if use is None:
            continue
        target: Any = parser
        if use.group is not None:
            if use.group not in groups:
                groups[use.group] = parser.add_argument_group(
                    use.group, GROUP_DESCRIPTIONS.get(use.group)
                )
            target = groups[use.group]
        keywords = {
            **flag.keywords,
            **use.extra,
            **overrides.get(flag.name, {}),
            "help": use.help,
        }
        target.add_argument(flag.name, **keywords)
