"""A model's files other than its weights (config, tokenizer, generation and processor
configs, chat templates, remote code, sentence-transformers modules): copy them beside the
tensors when serializing or converting (`stage_artifacts`, which also writes `MANIFEST`, the
list of what it carried); `remote_files.fetch_model_files` fetches them into a local cache
when loading a remote model. The output directory is then the whole model for vLLM and
transformers.

Everything in the model directory and its sub-directories is carried (``*.py`` of
``auto_map`` for ``trust_remote_code``, ``modules.json``, ``1_Pooling/config.json``, the
``2_Dense/model.safetensors`` projection that vLLM's sentence-transformers loader reads from
the model directory, ``additional_chat_templates/*.jinja``, ...; a linked sub-directory is
followed once) except: the model's own weights at the top level (`WEIGHT_SUFFIXES`, which
the tensors file replaces), this package's tensors, key and lock files anywhere, hidden
files and directories (``.git``, ``.cache``), names that are not plain (a remote object's
name can never make a file land outside the cache directory) and files larger than
`MAX_ARTIFACT_BYTES`. What is left out is listed (`LeftOut`, logged by the writers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from .. import storage
from ..core.errors import ConfigError, StorageError
from ..core.redaction import scrubbing

__all__ = [
    "MANIFEST",
    "MAX_ARTIFACT_BYTES",
    "module_directories",
    "in_module",
    "WEIGHT_SUFFIXES",
    "LeftOut",
    "is_artifact_name",
    "too_large",
    "left_out",
    "artifact_files",
    "check_model_ref",
    "resolve_model_files",
    "stage_artifacts",
]

logger = scrubbing("tensorize_vllm_model")

MAX_ARTIFACT_BYTES = 64 * 1024 * 1024

# The list of the files `stage_artifacts` carried, written beside them: what a reader that
# cannot list a directory (HTTP) fetches.
MANIFEST = "tensorize_model_files.json"

# The model's weights (and a weights index) at the top level of its directory, which the
# tensors file replaces. In a sub-directory they are carried: a sentence-transformers module
# (``2_Dense/model.safetensors``) is read from the model directory by vLLM.
WEIGHT_SUFFIXES = (
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
)
# this package's own tensors, key and lock files, wherever they are
_OWN_SUFFIXES = (".tensors", ".lock", ".key")
# asked of an offline Hub cache, which cannot list a repository
_OFFLINE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab", ".py")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# each rank's compile cache (`compile_cache.archive_uri`): read by that rank from beside its
# tensors, never carried or fetched with the model's files
_COMPILE_ARCHIVE = re.compile(r"^compile-cache-rank-\d+\.tar$")


@dataclass(frozen=True)
class LeftOut:
    """A file of the model directory not carried, and why."""

    path: str  # relative to the model directory, "/"-separated
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def is_artifact_name(name: str) -> bool:
    """Whether the file at relative path `name` ("/"-separated) is one to carry: plain
    names (no hidden part, no ``..``), not the model's top-level weights, not this
    package's tensors, key, lock or compile-cache files. Its size is checked apart
    (`too_large`)."""
    parts = name.split("/")
    if not all(_SAFE_NAME.match(p) for p in parts) or name.endswith(_OWN_SUFFIXES):
        return False
    if _COMPILE_ARCHIVE.match(name):
        return False
    return len(parts) > 1 or not name.endswith(WEIGHT_SUFFIXES)


def module_directories(modules: object) -> set[str]:
    """The sub-directories a sentence-transformers ``modules.json`` (parsed) names: vLLM
    reads their weights (a ``2_Dense`` projection) from the model directory, so their files
    are carried whatever their size."""
    found = set()
    for module in modules if isinstance(modules, list) else []:
        sub = str(module.get("path") or "").strip("/") if isinstance(module, dict) else ""
        if sub and is_artifact_name(sub):
            found.add(sub)
    return found


def in_module(name: str, modules: set[str]) -> bool:
    """Whether relative path `name` lies in one of `modules` (`module_directories`)."""
    return any(name.startswith(m + "/") for m in modules)


def _modules_of(directory: str) -> set[str]:
    try:
        with open(os.path.join(directory, "modules.json")) as f:
            return module_directories(json.load(f))
    except (OSError, ValueError):
        return set()


def too_large(name: str) -> LeftOut:
    """`name` left out for being larger than `MAX_ARTIFACT_BYTES`."""
    return LeftOut(
        name,
        f"larger than {MAX_ARTIFACT_BYTES >> 20} MiB: vLLM and transformers, which read it "
        "from the model directory, will miss it",
    )


def left_out(name: str) -> LeftOut:
    """`name`, not an artifact's (`is_artifact_name`), left out with the reason."""
    return LeftOut(name, _reason(name))


def _reason(name: str) -> str:
    parts = name.split("/")
    if any(p.startswith(".") for p in parts):
        return "hidden"
    if not all(_SAFE_NAME.match(p) for p in parts):
        return "not a plain file name"
    if name.endswith(".tensors"):
        return "tensors"
    if name.endswith((".key", ".lock")):
        return "key or lock file"
    return "weights"


def artifact_files(directory: str, output: str | None = None) -> tuple[list[str], list[LeftOut]]:
    """(relative paths of the files of local `directory` to carry, sorted; what is left out).

    Walks sub-directories, linked ones too (a second name for a directory is walked again),
    but not hidden ones, one that holds the model directory or the directory being walked (a
    link to a parent, ``/`` or home: a loop, or files from outside the model), or one that
    holds the local `output` directory (a serialize into the model's own directory). Files of
    the module directories of ``modules.json`` are carried whatever their size."""
    carried: list[str] = []
    left: list[LeftOut] = []
    inside = os.path.realpath(output) + os.sep if output else None
    modules = _modules_of(directory)
    model = os.path.realpath(directory) + os.sep
    for root, dirs, files in os.walk(directory, followlinks=True):
        rel_root = os.path.relpath(root, directory)
        here = os.path.realpath(root) + os.sep
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if d.startswith("."):
                left.append(LeftOut(_rel(rel_root, d) + "/", "hidden"))
            elif inside is not None and inside.startswith(real + os.sep):
                left.append(LeftOut(_rel(rel_root, d) + "/", "holds the output directory"))
            elif here.startswith(holder := real.rstrip(os.sep) + os.sep) or model.startswith(
                holder
            ):
                left.append(LeftOut(_rel(rel_root, d) + "/", "a link to a directory holding it"))
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            rel = _rel(rel_root, name)
            path = os.path.join(root, name)
            if not is_artifact_name(rel):
                left.append(LeftOut(rel, _reason(rel)))
            elif not os.path.isfile(path):
                left.append(LeftOut(rel, "not a regular file (a broken link?)"))
            elif os.path.getsize(path) > MAX_ARTIFACT_BYTES and not in_module(rel, modules):
                left.append(too_large(rel))
            elif rel != MANIFEST:  # `stage_artifacts` writes its own
                carried.append(rel)
    return sorted(carried), left


def _rel(root: str, name: str) -> str:
    return name if root == "." else f"{root.replace(os.sep, '/')}/{name}"


def check_model_ref(model: str) -> None:
    """Refuse a `model` that is a file (``--model DIR/model.safetensors``): --model names
    the checkpoint directory or a Hub id.

    Raises:
        ConfigError: naming the file and the directory to give instead.
    """
    if os.path.isfile(model):
        raise ConfigError(
            f"--model {model!r} is a file; --model takes the checkpoint DIRECTORY (the one "
            f"holding config.json and the weights), here --model {os.path.dirname(model) or '.'!r}"
        )


def resolve_model_files(
    model: str,
    *,
    revision: str | None = None,
    download_dir: str | None = None,
    weights: bool | list[str] = False,
) -> str:
    """A local directory holding `model`'s files other than its weights, and with `weights`
    every other file of the repository too (True) or the weight files named (a list).

    `model` is a local directory, or a Hugging Face Hub id resolved through the local
    Hugging Face cache (which the vLLM engine has just filled) or the Hub.

    Raises:
        ConfigError: `model` is a file (`check_model_ref`).
        StorageError: `model` is neither a local directory nor a Hub id the Hub gives.
    """
    if os.path.isdir(model):
        return model
    check_model_ref(model)
    try:
        from huggingface_hub import snapshot_download

        if weights is True:
            return snapshot_download(model, revision=revision, cache_dir=download_dir)
        patterns = _hub_files(model, revision) + (weights if isinstance(weights, list) else [])
        return snapshot_download(
            model, revision=revision, cache_dir=download_dir, allow_patterns=patterns
        )
    except Exception as e:  # noqa: BLE001 - the Hub raises many kinds
        raise StorageError(
            f"cannot find the config and tokenizer files of --model {model!r}: it is not a "
            f"local directory and the Hugging Face Hub did not give them ({e}); give the "
            "checkpoint DIRECTORY (config.json beside the weights) or a Hub id (org/name)"
        ) from None


def _hub_files(model: str, revision: str | None) -> list[str]:
    """The files of Hub repository `model` to carry (`is_artifact_name`, at most
    `MAX_ARTIFACT_BYTES`: Llama's ``original/consolidated.00.pth`` is never fetched);
    offline (the Hub cache that vLLM has just filled), patterns of the usual such files."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = list(HfApi().list_repo_tree(model, revision=revision, recursive=True))
    except Exception:  # noqa: BLE001 - offline, or a Hub that does not answer
        return [f"*{s}" for s in _OFFLINE_SUFFIXES] + ["*/*.json", "*/*.safetensors"]
    return [
        f.path
        for f in tree
        if isinstance(f, RepoFile) and is_artifact_name(f.path) and f.size <= MAX_ARTIFACT_BYTES
    ]


def stage_artifacts(
    tx: storage.Transaction, sources: Iterable[str], destination: str
) -> list[LeftOut]:
    """Stage copies of every file but the weights of local directories `sources` (and their
    sub-directories) into `destination`, in transaction `tx` (the first source wins when
    two have the same file), and `MANIFEST` (``{"files": [relative paths]}``) listing them.

    Returns:
        What was left out (weights, hidden, too large), also logged.

    Raises:
        StorageError: a file cannot be copied (named); `tx` rolls back the others.
    """
    seen: set[str] = set()
    left_out: list[LeftOut] = []
    for source in sources:
        carried, left = artifact_files(source, storage.local_path(destination))
        left_out += [item for item in left if item.path not in seen]
        for rel in carried:
            if rel not in seen:
                seen.add(rel)
                _stage_copy(tx, os.path.join(source, *rel.split("/")), destination, rel)
    target = tx.stage(storage.join(destination, MANIFEST))
    with open(target.path, "w") as f:
        json.dump({"files": sorted(seen)}, f, indent=1)
    if left_out:
        logger.info(
            "Not carried to %s: %s",
            storage.redact(destination),
            ", ".join(str(item) for item in left_out),
        )
    return left_out


def _stage_copy(tx: storage.Transaction, path: str, destination: str, rel: str) -> None:
    final = storage.join(destination, rel)
    if "/" in rel and storage.local_path(final) is not None:
        os.makedirs(os.path.dirname(storage.local_path(final) or ""), exist_ok=True)
    target = tx.stage(final)
    try:
        shutil.copyfile(path, target.path)
    except OSError as e:
        raise StorageError(f"cannot write {target.uri} (copying {path}): {e.strerror or e}") from e
