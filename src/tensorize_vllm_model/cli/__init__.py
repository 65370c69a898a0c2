"""The command line, faithful to vLLM's example script ``tensorize_vllm_model.py``.

    python -m tensorize_vllm_model [vLLM engine flags] serialize \
        --serialized-directory DIR [--suffix S] [--keyfile K] [--serialization-kwargs JSON]
    python -m tensorize_vllm_model [vLLM engine flags] deserialize \
        (--serialized-directory DIR | --path-to-tensors URI) [--keyfile K] \
        [--deserialization-kwargs JSON] [tensorizer options]
    python -m tensorize_vllm_model inspect|verify URI [--keyfile K] [remote storage flags]
    python -m tensorize_vllm_model --model SRC [--dtype D] [--revision R] convert \
        --serialized-directory DIR [--suffix S] [--keyfile K] [--serialization-kwargs JSON]

`main(argv)` returns the exit code: 0 on success, 2 for bad input (a one-line
``error: ...`` on stderr naming the flag, file or key at fault, no traceback).

Modules: `flags` (every flag of every command, one table), `parsers` (one argparse parser per
command, built from it, and `parse_command_line`), `configs` (flags -> TensorizerConfig), `commands` (the work), `output` (what is
printed), `entry` (`main`, and the one place errors become exit codes).
"""

from .configs import deserialize_config, serialize_config
from .entry import main
from .parsers import build_parser, parse_command_line

__all__ = ["build_parser", "deserialize_config", "main", "parse_command_line", "serialize_config"]
