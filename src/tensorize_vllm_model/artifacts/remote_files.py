"""The cache of a remote model directory's files other than its weights (`fetch_model_files`):
what `model_files.stage_artifacts` carried beside the tensors, fetched from S3, GCS, Azure
(listed, sub-directories included) or HTTP(S) (which cannot list: the files the writer's
`model_files.MANIFEST` names, else the usual names) so that vLLM and transformers can read
them from a local directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from .. import storage
from ..core.errors import NotFound, StorageError, TooLarge
from ..core.redaction import scrubbing
from ..core.settings import environment
from .model_files import (
    MANIFEST,
    MAX_ARTIFACT_BYTES,
    LeftOut,
    in_module,
    is_artifact_name,
    left_out,
    module_directories,
    too_large,
)

__all__ = ["fetch_model_files"]

logger = scrubbing("tensorize_vllm_model")

# What an HTTP server (which cannot list a directory) is asked for when the directory has no
# `MANIFEST` (not written by this package); remote code named by ``auto_map`` and
# sentence-transformers modules named by ``modules.json`` are asked too.
COPY_BYTES = 8 << 20  # a large module weight is copied to the cache in pieces of this
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
    "tekken.json",
    "params.json",
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
_MODULE_FILES = (
    "config.json",
    "sentence_bert_config.json",
    "model.safetensors",
    "pytorch_model.bin",
)


def fetch_model_files(uri: str, options: storage.Options = None) -> str:
    """Copy the artifact files of remote model directory `uri` (and of its sub-directories)
    into a local cache directory; files larger than `MAX_ARTIFACT_BYTES`, the top-level
    weights and what is not a plain name are not fetched (logged).

    The files are fetched into a directory staged in a `storage.transaction` and published
    whole (a rename), so the cache never holds a half-fetched model: a failure or an
    interrupt leaves the cache as it was (an earlier copy intact), and two processes that
    fetch the same model at once leave one whole copy.

    Returns:
        The local directory (``<cache>/models/<hash of uri>``).

    Raises:
        StorageError: the directory cannot be listed, holds no ``config.json``, its
            `MANIFEST` is not a list of files, or a file cannot be fetched.
    """
    uri = uri.rstrip("/")
    names = storage.list_names(uri, options, recursive=True)
    left = [left_out(n) for n in names or [] if not is_artifact_name(n)]
    root = os.path.join(environment().cache_dir, "models")
    final = os.path.join(root, hashlib.sha256(uri.encode()).hexdigest()[:16])
    with storage.transaction(options) as tx:
        staged = tx.stage_directory(final).path
        if names is not None:
            if "config.json" not in names:
                raise StorageError(
                    f"{storage.redact(uri)} holds no config.json; is it a serialized model "
                    "directory (DIR/vllm/<model>/<suffix>)?"
                )
            wanted = [n for n in names if is_artifact_name(n) and n != MANIFEST]
            _fetch_all(uri, wanted, staged, options, left)
        else:
            _fetch_unlisted(uri, staged, options, left)
        if not os.path.exists(os.path.join(staged, "config.json")):
            raise StorageError(f"{storage.redact(uri)}/config.json was not found")
    if left:
        logger.info("Not fetched from %s: %s", storage.redact(uri), ", ".join(str(x) for x in left))
    return final


def _fetch_unlisted(uri: str, into: str, options: storage.Options, left: list[LeftOut]) -> None:
    """HTTP: the files the writer's `MANIFEST` names, all of them; without one (a directory
    this package did not write), the usual names, then the remote code of ``auto_map`` and
    the files of ``modules.json``'s module directories, those the server has."""
    manifest = _fetch(uri, MANIFEST, options, required=False)
    if manifest is not None:
        _fetch_all(uri, _manifest_files(uri, manifest), into, options, left)
        return
    fetched = _fetch_all(uri, list(_WELL_KNOWN), into, options, left, required=False)
    _fetch_all(uri, _named_by(into, fetched), into, options, left, required=False)
    logger.info(
        "%s has no %s (it was not written by this package): fetched the usual names, the "
        "remote code of auto_map and the modules of modules.json; other files (such as "
        "additional_chat_templates/) cannot be found without listing",
        storage.redact(uri),
        MANIFEST,
    )


def _manifest_files(uri: str, data: bytes) -> list[str]:
    try:
        files = json.loads(data)["files"]
    except (ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise StorageError(
            f"{storage.redact(uri)}/{MANIFEST} is not a JSON object with a list of files "
            '("files"); write the directory again or remove that file'
        )
    return [f for f in files if is_artifact_name(f)]


def _fetch_all(
    uri: str,
    names: list[str],
    into: str,
    options: storage.Options,
    left: list[LeftOut],
    *,
    required: bool = True,
) -> list[str]:
    """Fetch files `names` (relative paths) of `uri` into local directory `into`: the
    names fetched (a missing one is skipped unless `required`; one too large is added to
    `left`)."""
    fetched, large = [], []
    for name in names:
        try:
            data = _fetch(uri, name, options, required=required)
        except TooLarge:
            large.append(name)
            continue
        if data is not None:
            _write(into, name, data)
            fetched.append(name)
    modules = module_directories(_json(os.path.join(into, "modules.json")))
    for name in large:  # a module's weights (vLLM reads them) whatever their size
        if not in_module(name, modules):
            left.append(too_large(name))
            continue
        _copy(storage.join(uri, name), into, name, options)
        fetched.append(name)
    return fetched


def _copy(source: str, into: str, name: str, options: storage.Options) -> None:
    """Copy remote file `source` to `name` under `into` in pieces of `COPY_BYTES`: a module
    weight larger than `MAX_ARTIFACT_BYTES` never sits in memory whole."""
    with storage.open_read(source, options) as stream, open(_local(into, name), "wb") as f:
        shutil.copyfileobj(stream, f, COPY_BYTES)


def _write(into: str, name: str, data: bytes) -> None:
    with open(_local(into, name), "wb") as f:
        f.write(data)


def _local(into: str, name: str) -> str:
    """The local path of relative name `name` ("/"-separated) under `into`, its directory
    made."""
    path = os.path.join(into, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _named_by(local: str, fetched: list[str]) -> list[str]:
    """Files the fetched ones name that are not fetched yet: the usual files of the module
    directories of ``modules.json`` (sentence-transformers) and the remote code of
    ``auto_map``."""
    wanted: list[str] = []
    for sub in sorted(module_directories(_json(os.path.join(local, "modules.json")))):
        wanted += [f"{sub}/{n}" for n in _MODULE_FILES]
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
    does not have (not `required`). Raises `TooLarge` over `MAX_ARTIFACT_BYTES`."""
    if not is_artifact_name(name):
        return None
    try:
        return storage.read_bytes(storage.join(uri, name), options, limit=MAX_ARTIFACT_BYTES)
    except NotFound:
        if required:
            raise
        return None
