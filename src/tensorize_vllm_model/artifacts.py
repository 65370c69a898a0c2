"""A model's small files (config, tokenizer, generation config): copy them beside the
tensors when serializing; fetch them into a local cache when loading a remote model.

Only files directly in the model directory whose names look like such files are taken:
weights, hidden files, sub-directories and anything larger than `MAX_ARTIFACT_BYTES` are
left out, and a remote object's name can never make a file land outside the cache directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterable

from . import storage
from .errors import NotFound, StorageError
from .settings import environment

__all__ = [
    "MAX_ARTIFACT_BYTES",
    "is_artifact_name",
    "artifact_files",
    "resolve_model_files",
    "stage_artifacts",
    "fetch_model_files",
]

MAX_ARTIFACT_BYTES = 64 * 1024 * 1024

# Files beside the weights that vLLM and transformers read; weights and clutter are not.
_ARTIFACT_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab")
_SKIPPED_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".tensors",
    ".index.json",
    ".md",
    ".gitattributes",
    ".lock",
    ".key",
)
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# What an HTTP server (which cannot list a directory) is asked for.
_WELL_KNOWN = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


def is_artifact_name(name: str) -> bool:
    """Whether a file called `name` is a config/tokenizer file to carry with the model."""
    return bool(
        _SAFE_NAME.match(name)
        and name.endswith(_ARTIFACT_SUFFIXES)
        and not name.endswith(_SKIPPED_SUFFIXES)
    )


def artifact_files(directory: str) -> list[str]:
    """Paths of the artifact files directly in local `directory`."""
    return [
        os.path.join(directory, name)
        for name in storage.list_names(directory) or []
        if is_artifact_name(name)
    ]


def resolve_model_files(
    model: str,
    *,
    revision: str | None = None,
    download_dir: str | None = None,
    weights: bool | list[str] = False,
) -> str:
    """A local directory holding `model`'s config and tokenizer files, and with `weights`
    every other file of the repository too (True) or the files named (a list).

    `model` is a local directory, or a Hugging Face Hub id resolved through the local
    Hugging Face cache (which the vLLM engine has just filled) or the Hub.
    """
    if os.path.isdir(model):
        return model
    patterns = [f"*{s}" for s in _ARTIFACT_SUFFIXES]
    if isinstance(weights, list):
        patterns += weights
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            model,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=None if weights is True else patterns,
        )
    except Exception as e:  # noqa: BLE001 - the Hub raises many kinds
        raise StorageError(
            f"cannot find the config and tokenizer files of --model {model!r}: it is not a "
            f"local directory and the Hugging Face Hub did not give them ({e})"
        ) from None


def stage_artifacts(tx: storage.Transaction, sources: Iterable[str], destination: str) -> None:
    """Stage copies of the artifact files of local directories `sources` into
    `destination`, in transaction `tx` (the first source wins when two have the same file).

    Raises:
        StorageError: a file cannot be copied (named); `tx` rolls back the others.
    """
    seen: set[str] = set()
    for source in sources:
        for path in artifact_files(source):
            name = os.path.basename(path)
            if name in seen:
                continue
            seen.add(name)
            target = tx.stage(storage.join(destination, name))
            try:
                shutil.copyfile(path, target.path)
            except OSError as e:
                raise StorageError(
                    f"cannot write {target.uri} (copying {path}): {e.strerror or e}"
                ) from e


def fetch_model_files(uri: str, options: storage.Options = None) -> str:
    """Copy the artifact files of remote model directory `uri` into a local cache directory.

    The files are fetched into a directory staged in a `storage.transaction` and published
    whole (a rename), so the cache never holds a half-fetched model: a failure or an
    interrupt leaves the cache as it was (an earlier copy intact), and two processes that
    fetch the same model at once leave one whole copy.

    Returns:
        The local directory (``<cache>/models/<hash of uri>``).

    Raises:
        StorageError: the directory cannot be listed, holds no ``config.json``, or a file
            cannot be fetched.
    """
    uri = uri.rstrip("/")
    names = storage.list_names(uri, options)
    if names is None:  # HTTP: ask for the usual names
        candidates = list(_WELL_KNOWN)
    else:
        candidates = [n for n in names if is_artifact_name(n)]
        if "config.json" not in candidates:
            raise StorageError(
                f"{storage.redact(uri)} holds no config.json; is it a serialized model "
                "directory (DIR/vllm/<model>/<suffix>)?"
            )
    root = os.path.join(environment().cache_dir, "models")
    final = os.path.join(root, hashlib.sha256(uri.encode()).hexdigest()[:16])
    with storage.transaction(options) as tx:
        staged = tx.stage_directory(final)
        for name in candidates:
            data = _fetch(uri, name, options, required=names is not None)
            if data is not None:
                with open(os.path.join(staged.path, name), "wb") as f:
                    f.write(data)
        if not os.path.exists(os.path.join(staged.path, "config.json")):
            raise StorageError(f"{storage.redact(uri)}/config.json was not found")
    return final


def _fetch(uri: str, name: str, options: storage.Options, *, required: bool) -> bytes | None:
    """The bytes of artifact `name` of `uri`; None for a name that is not an artifact's
    (never a path: nothing lands outside the staged directory) or a usual name this model
    does not have (not `required`)."""
    if not is_artifact_name(name):
        return None
    try:
        return storage.read_bytes(storage.join(uri, name), options, limit=MAX_ARTIFACT_BYTES)
    except NotFound:
        if required:
            raise
        return None
