"""The tensorizer flags of vLLM's example script (`TENSORIZER_CLI_FLAGS`)."""

from __future__ import annotations

from typing import Any

__all__ = ["TENSORIZER_CLI_FLAGS"]

# The tensorizer flags of vLLM's example script: argparse keywords, help included.
# `TensorizerArgs.add_cli_args` adds them all; the command line (cli/flags.py) takes the
# S3 flags and --num-readers from here too, so each is defined once.
TENSORIZER_CLI_FLAGS: dict[str, dict[str, Any]] = {
    "--tensorizer-uri": {
        "type": str,
        "help": "Path to serialized model tensors: a local path, or an HTTP(S) or S3 URI. "
        "The same as --path-to-tensors.",
    },
    "--verify-hash": {
        "action": "store_true",
        "default": None,
        "help": "Check every tensor's stored hash while loading; a mismatch is an error "
        "naming the tensor.",
    },
    "--encryption-keyfile": {
        "type": str,
        "default": None,
        "help": "The file (path or S3 URI) holding the binary key that decrypts the "
        "tensors. The same as --keyfile.",
    },
    "--num-readers": {
        "type": int,
        "default": None,
        "help": "How many threads read the tensors concurrently (default: chosen for the source).",
    },
    "--s3-access-key-id": {
        "type": str,
        "default": None,
        "help": "The S3 access key (else S3_ACCESS_KEY_ID, the AWS credential chain, ~/.s3cfg).",
    },
    "--s3-secret-access-key": {
        "type": str,
        "default": None,
        "help": "The S3 secret key. Prefer the S3_SECRET_ACCESS_KEY environment variable: "
        "command lines are visible to other users of the machine.",
    },
    "--s3-endpoint": {
        "type": str,
        "default": None,
        "help": "The S3 endpoint URL (else S3_ENDPOINT_URL).",
    },
}
