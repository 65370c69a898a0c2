"""A model's files other than its weights (config, tokenizer, generation and processor
configs, chat templates, remote code, sentence-transformers modules): copy them beside the
tensors when serializing or converting; fetch them into a local cache when loading a remote
model. The output directory is then the whole model for vLLM and transformers.

Everything in the model directory and its sub-directories is carried (``*.py`` of
``auto_map`` for ``trust_remote_code``, ``modules.json`` and ``1_Pooling/config.json``, ...)
except: the weights (`WEIGHT_SUFFIXES`), hidden files and directories (``.git``,
``.cache``), names that are not plain (a remote object's name can never make a file land
outside the cache directory) and files larger than `MAX_ARTIFACT_BYTES`. What is left out is
listed (`LeftOut`, logged by the writers).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from .. import storage
from ..core.errors import NotFound, StorageError
from ..core.redaction import scrubbing
from ..core.settings import environment

__all__ = [
    "MAX_ARTIFACT_BYTES",
    "WEIGHT_SUFFIXES",
    "LeftOut",
    "is_artifact_name",
    "artifact_files",
    "resolve_model_files",
    "stage_artifacts",
    "fetch_model_files",
]

logger = scrubbing("tensorize_vllm_model")

MAX_ARTIFACT_BYTES = 64 * 1024 * 1024

# The weights (and a weights index), which the tensors file replaces; and this package's
# own key files and lock files.
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
_SKIPPED_SUFFIXES = (*WEIGHT_SUFFIXES, ".lock", ".key")
# asked of an offline Hub cache, which cannot list a repository
_OFFLINE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".vocab", ".py")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# What an HTTP server (which cannot list a directory) is asked for; remote code named by
# ``auto_map`` and sentence-transformers modules named by ``modules.json`` are asked too.
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
    "processor_config.json",
    "video_preprocessor_config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
# the files of a sentence-transformers module directory (``1_Pooling``, ``2_Dense``, ...)
_MODULE_FILES = ("config.json", "sentence_bert_config.json")


@dataclass(frozen=True)
class LeftOut:
    """A file of the model directory not carried, and why."""

    path: str  # relative to the model directory, "/"-separated
    reason: str

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def is_artifact_name(name: str) -> bool:
    """Whether the file at relative path `name` ("/"-separated) is one to carry: plain
    names (no hidden part, no ``..``), not weights."""
    parts = name.split("/")
    return bool(all(_SAFE_NAME.match(p) for p in parts) and not name.endswith(_SKIPPED_SUFFIXES))


def _reason(name: str) -> str:
    if name.endswith(WEIGHT_SUFFIXES):
        return "weights"
    if any(p.startswith(".") for p in name.split("/")):
        return "hidden"
    return "not a plain file name"


def artifact_files(directory: str, output: str | None = None) -> tuple[list[str], list[LeftOut]]:
    """(relative paths of the files of local `directory` to carry, sorted; what is left out).

    Walks sub-directories, but not hidden ones, symlinked ones, or one that holds the local
    `output` directory (a serialize into the model's own directory)."""
    carried: list[str] = []
    left: list[LeftOut] = []
    inside = os.path.realpath(output) + os.sep if output else None
    for root, dirs, files in os.walk(directory):
        rel_root = os.path.relpath(root, directory)
        keep = []
        for d in sorted(dirs):
            here = os.path.realpath(os.path.join(root, d)) + os.sep
            if d.startswith("."):
                left.append(LeftOut(_rel(rel_root, d) + "/", "hidden"))
            elif inside is not None and inside.startswith(here):
                left.append(LeftOut(_rel(rel_root, d) + "/", "holds the output directory"))
            else:
                keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            rel = _rel(rel_root, name)
            if not is_artifact_name(rel):
                left.append(LeftOut(rel, _reason(rel)))
            elif os.path.getsize(os.path.join(root, name)) > MAX_ARTIFACT_BYTES:
                left.append(LeftOut(rel, f"larger than {MAX_ARTIFACT_BYTES >> 20} MiB"))
            else:
                carried.append(rel)
    return sorted(carried), left


def _rel(root: str, name: str) -> str:
    return name if root == "." else f"{root.replace(os.sep, '/')}/{name}"


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
    """
    if os.path.isdir(model):
        return model
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
            f"local directory and the Hugging Face Hub did not give them ({e})"
        ) from None


def _hub_files(model: str, revision: str | None) -> list[str]:
    """The files of Hub repository `model` but its weights; offline (the Hub cache that vLLM
    has just filled), patterns of the usual such files."""
    from huggingface_hub import list_repo_files

    try:
        files = list_repo_files(model, revision=revision)
    except Exception:  # noqa: BLE001 - offline, or a Hub that does not answer
        return [f"*{s}" for s in _OFFLINE_SUFFIXES] + ["*/*.json"]
    return [f for f in files if is_artifact_name(f)]


def stage_artifacts(
    tx: storage.Transaction, sources: Iterable[str], destination: str
) -> list[LeftOut]:
    """Stage copies of every file but the weights of local directories `sources` (and their
    sub-directories) into `destination`, in transaction `tx` (the first source wins when
    two have the same file).

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
            if rel in seen:
                continue
            seen.add(rel)
            final = storage.join(destination, rel)
            if "/" in rel and storage.local_path(final) is not None:
                os.makedirs(os.path.dirname(storage.local_path(final) or ""), exist_ok=True)
            target = tx.stage(final)
            path = os.path.join(source, *rel.split("/"))
            try:
                shutil.copyfile(path, target.path)
            except OSError as e:
                raise StorageError(
                    f"cannot write {target.uri} (copying {path}): {e.strerror or e}"
                ) from e
    if left_out:
        logger.info(
            "Not carried to %s: %s",
            storage.redact(destination),
            ", ".join(str(item) for item in left_out),
        )
    return left_out


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
    listed = names is not None
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
        fetched = _fetch_all(uri, candidates, staged.path, options, required=listed)
        for name in _named_by(staged.path, fetched, uri, options, listed):
            _fetch_all(uri, [name], staged.path, options, required=listed)
        if not os.path.exists(os.path.join(staged.path, "config.json")):
            raise StorageError(f"{storage.redact(uri)}/config.json was not found")
    if names:
        left = [str(LeftOut(n, _reason(n))) for n in names if not is_artifact_name(n)]
        if left:
            logger.info("Not fetched from %s: %s", storage.redact(uri), ", ".join(left))
    return final


def _fetch_all(
    uri: str, names: list[str], into: str, options: storage.Options, *, required: bool
) -> list[str]:
    """Fetch files `names` (relative paths) of `uri` into local directory `into`: the
    names fetched (a missing one is skipped unless `required`)."""
    fetched = []
    for name in names:
        data = _fetch(uri, name, options, required=required)
        if data is None:
            continue
        path = os.path.join(into, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        fetched.append(name)
    return fetched


def _named_by(
    local: str, fetched: list[str], uri: str, options: storage.Options, listed: bool
) -> list[str]:
    """Files the fetched ones name that are not fetched yet: the module directories of
    ``modules.json`` (sentence-transformers; listed where the scheme can list, else their
    usual files) and, where the scheme cannot list, the remote code of ``auto_map``."""
    wanted: list[str] = []
    modules = _json(os.path.join(local, "modules.json"))
    for module in modules if isinstance(modules, list) else []:
        sub = str(module.get("path") or "").strip("/") if isinstance(module, dict) else ""
        if not sub or not is_artifact_name(sub):
            continue
        if listed:
            names = storage.list_names(storage.join(uri, sub), options) or []
            wanted += [f"{sub}/{n}" for n in names if is_artifact_name(f"{sub}/{n}")]
        else:
            wanted += [f"{sub}/{n}" for n in _MODULE_FILES]
    if not listed:
        for config in ("config.json", "tokenizer_config.json"):
            wanted += _remote_code(_json(os.path.join(local, config)))
    return [n for n in dict.fromkeys(wanted) if n not in fetched]


def _remote_code(config: object) -> list[str]:
    """The ``*.py`` files an ``auto_map`` names (``"configuration_x.XConfig"``; references
    into another repository, ``"repo--module.Class"``, are not this directory's)."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    refs: list[str] = []
    for value in (auto_map or {}).values() if isinstance(auto_map, dict) else []:
        refs += value if isinstance(value, list) else [value]
    modules = [r.rsplit(".", 1)[0] for r in refs if isinstance(r, str) and "--" not in r]
    return [f"{m}.py" for m in dict.fromkeys(modules) if m and "." not in m]


def _json(path: str) -> object:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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
