"""vLLM's side of the shipped compile cache (`compile_cache`): which local directories hold
a worker's compiled artifacts, and the key they depend on.

vLLM 0.32-0.34 with torch >= 2.10 compile "AOT" by default (``VLLM_USE_AOT_COMPILE``): each
compiled module (``@support_torch_compile``, e.g. Llama's backbone) is saved under
``$VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<hash>/`` as ``rank_<i>_<j>/model``,
and vLLM points ``TORCHINDUCTOR_CACHE_DIR`` at ``<hash>/inductor_cache/`` (read in
``vllm/compilation/decorators.py``). ``<hash>`` covers vLLM's compile-environment factors,
``VllmConfig.compute_hash()`` (which includes the model's *path*) and the module's forward
(its qualified name and line). A serialize's engine loads the checkpoint's directory and a
load the tensorized one, so the two hashes differ by the path alone. Neither side computes
vLLM's path: `aot_load` hands `before_aot_load` the path vLLM itself computed, as vLLM is
about to read it (at the first forward, after the weights are loaded). The capture side
remembers it and packs that directory at save; the load side (the loader read the archive,
`stage_for_load`) writes the archive's files there, after checking that the
`compile_cache.CacheKey` (every factor but the path, computed at the same moment) is equal.

Nothing is shipped or restored when the engine does not compile (``enforce_eager``, LoRA on
CPU), when ``VLLM_DISABLE_COMPILE_CACHE=1`` or ``VLLM_USE_AOT_COMPILE=0``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from vllm.logger import init_logger

from ... import storage
from ...artifacts import compile_cache
from ...artifacts.compile_cache import CacheKey
from ...core.redaction import scrubbing
from .runtime import current_layout, torch_dtype_name

__all__ = [
    "before_aot_load",
    "cache_key",
    "pack_for_save",
    "stage_for_load",
    "write_model_info",
    "put_back_model_info",
]

logger = scrubbing(init_logger(f"vllm.{__name__}"))


def _device() -> str:
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda {torch.cuda.get_device_name(index)} sm_{major}{minor}"
    return f"cpu {torch.backends.cpu.get_cpu_capability()}"


def config_hash(vllm_config: Any) -> str:
    """vLLM's compile-environment and configuration hashes, with the model's path replaced
    by a constant (the only factor a serialize's engine and a load's differ by)."""
    from vllm import envs
    from vllm.config.utils import hash_factors

    model_config = vllm_config.model_config
    path = model_config.model
    object.__setattr__(model_config, "model", "<model>")
    try:
        config = vllm_config.compute_hash()
    finally:
        object.__setattr__(model_config, "model", path)
    environment = hash_factors(envs.compile_factors())
    return hashlib.sha256(f"{config} {environment}".encode()).hexdigest()[:32]


def cache_key(vllm_config: Any) -> CacheKey:
    """This worker's `CacheKey`."""
    import vllm

    layout = current_layout(vllm_config)
    return CacheKey(
        vllm=vllm.__version__,
        torch=torch.__version__,
        device=_device(),
        dtype=torch_dtype_name(vllm_config.model_config.dtype),
        tensor_parallel_size=layout.tensor_parallel_size,
        pipeline_parallel_size=layout.pipeline_parallel_size,
        rank=layout.rank,
        config_hash=config_hash(vllm_config),
    )


# What this process's compiled modules use, as vLLM computed it at its AOT load: entry
# name -> (vLLM's ``rank_<i>_<j>/model`` path, the key); and the archive read by the
# loader, waiting for vLLM's compile (`before_aot_load`).
_compiled: dict[str, tuple[str, CacheKey]] = {}
_shipped: list[tuple[str, tuple[CacheKey, dict[str, bytes]]]] = []


def _uses_aot_cache() -> bool:
    from vllm import envs

    return bool(envs.VLLM_USE_AOT_COMPILE) and not envs.VLLM_DISABLE_COMPILE_CACHE


def _entry_name(module: Any) -> str:
    return str(getattr(module, "_compile_tag", "") or type(module).__name__)


def _targets(name: str, aot_path: str) -> dict[str, str]:
    """Entry name -> local directory, for one compiled module whose AOT artifact vLLM keeps
    at `aot_path` (``.../torch_aot_compile/<hash>/rank_<i>_<j>/model``)."""
    rank_dir = os.path.dirname(aot_path)
    return {
        f"{name}.rank": rank_dir,
        f"{name}.inductor_cache": os.path.join(os.path.dirname(rank_dir), "inductor_cache"),
    }


def before_aot_load(module: Any, aot_path: str) -> None:
    """Called (through `aot_load`) as vLLM is about to load `module`'s AOT artifact from
    `aot_path`, the path vLLM computed for this engine: remembers it (for `pack_for_save`)
    and, when the loader read a shipped cache whose key matches, writes its files there
    first. Never raises: a problem is logged and vLLM compiles as it would have."""
    try:
        name = _entry_name(module)
        key = cache_key(module.vllm_config)
        _compiled[name] = (aot_path, key)
        for uri, archive in _shipped:  # kept: another compiled module may need its entries
            written = compile_cache.restore(key, archive, _targets(name, aot_path))
            if written is not None:
                logger.info(
                    "Put the shipped compile cache of %s into %s (%d files new)",
                    storage.redact(uri),
                    os.path.dirname(os.path.dirname(aot_path)),
                    written,
                )
    except Exception as e:  # noqa: BLE001 - a cache must never stop a start-up
        logger.warning("The shipped compile cache was not used: %s", e)


def pack_for_save(
    tensors: Iterable[tuple[str, Any]], tensors_uri: str, tx: storage.Transaction
) -> str | None:
    """Stage this rank's compile cache in `tx` beside `tensors_uri`: the archive's URI, or
    None when there is nothing to ship (or it would hold weight bytes: then said, and not
    shipped)."""
    if not compile_cache.enabled():
        return None
    found = {
        entry: directory
        for name, (aot_path, _) in _compiled.items()
        for entry, directory in _targets(name, aot_path).items()
        if os.path.isfile(aot_path) and os.path.isdir(directory)
    }
    if not found:
        logger.info("No compile cache to keep with the model (the engine compiled nothing)")
        return None
    files = compile_cache.collect(found)
    leak = compile_cache.find_weight_bytes(files, tensors)
    if leak is not None:
        logger.warning(
            "The compile cache holds bytes of weight %s (in %s): not kept with the model",
            *leak,
        )
        return None
    key = next(iter(_compiled.values()))[1]
    uri = compile_cache.archive_uri(tensors_uri, key.rank)
    data = compile_cache.pack(key, files)
    with open(tx.stage(uri).path, "wb") as f:
        f.write(data)
    logger.info(
        "Keeping the compile cache with the model: %d files, %.1f MB, no weight bytes in "
        "them, at %s",
        len(files),
        len(data) / 1e6,
        storage.redact(uri),
    )
    return uri


def stage_for_load(vllm_config: Any, tensors_uri: str, options: storage.Options) -> bool:
    """Read this rank's shipped compile cache (if any), for `before_aot_load` to put into
    the directories vLLM's compile is about to read: whether one was found. Never fails
    the load: a problem is logged and vLLM compiles."""
    compiles = int(vllm_config.compilation_config.mode or 0) != 0  # not CompilationMode.NONE
    if not compiles or not compile_cache.enabled() or not _uses_aot_cache():
        return False
    uri = compile_cache.archive_uri(tensors_uri, current_layout(vllm_config).rank)
    try:
        if not storage.exists(uri, options):
            return False
        data = storage.read_bytes(uri, options, limit=compile_cache.ARCHIVE_LIMIT)
        _shipped[:] = [(uri, compile_cache.read_archive(data, uri))]
    except Exception as e:  # noqa: BLE001 - a cache must never stop a load
        logger.warning("The shipped compile cache %s was not used: %s", storage.redact(uri), e)
        return False
    return True


# -- vLLM's model-info cache -----------------------------------------------------------------
#
# Before it builds its config, vLLM inspects the model's class in a fresh Python process
# (`_run_in_subprocess` in vllm/model_executor/models/registry.py, vLLM 0.32-0.34) unless
# ``$VLLM_CACHE_ROOT/modelinfos/<module>-<class>.json`` holds the answer for the class file's
# hash: 8.8 s of every start on a fresh node here (SmolLM2's LlamaForCausalLM, 2 vCPUs).
# A serialize keeps its engine's entries with the model (`compile_cache.MODEL_INFO`) and a
# load puts them back before vLLM looks.


def _model_info_dir() -> str:
    from vllm import envs

    return os.path.join(envs.VLLM_CACHE_ROOT, "modelinfos")


def _model_info_names(architectures: Iterable[str]) -> list[str]:
    """vLLM's file names of the model-info entries of `architectures` (its registry's
    ``_LazyRegisteredModel._get_cache_filename``; others have none)."""
    from vllm.model_executor.models import ModelRegistry

    names = []
    for arch in architectures:
        filename = getattr(ModelRegistry.models.get(arch), "_get_cache_filename", None)
        if callable(filename):
            names.append(str(filename()))
    return names


def _architectures(sources: Iterable[str]) -> list[str] | None:
    """The architectures the first ``config.json`` of local directories `sources` names."""
    for source in sources:
        config = os.path.join(source, "config.json")
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                return list(json.load(f).get("architectures") or [])
    return None


def write_model_info(sources: Iterable[str], into: str) -> bool:
    """Write `compile_cache.MODEL_INFO` into directory `into` with vLLM's model-info
    entries of the architectures that the first ``config.json`` of `sources` (local model
    directories) names, as this process's vLLM cached them: whether there were any. Never
    raises: a problem is logged and the model is written without them."""
    if not compile_cache.enabled():
        return False
    try:
        architectures = _architectures(sources)
        if architectures is None:
            return False
        found = compile_cache.collect_model_info(
            _model_info_dir(), _model_info_names(architectures)
        )
        if not found:
            return False
        with open(os.path.join(into, compile_cache.MODEL_INFO), "w", encoding="utf-8") as f:
            json.dump(found, f, indent=1)
        return True
    except Exception as e:  # noqa: BLE001 - a cache must never stop a serialize
        logger.warning("vLLM's model info was not kept with the model: %s", e)
        return False


def put_back_model_info(model: str) -> None:
    """Put the model-info entries shipped in local model directory `model` into vLLM's
    cache, before vLLM inspects the model's class: only those of the architectures its
    ``config.json`` names. Never raises: a problem is logged and vLLM inspects the class as
    it would have."""
    path = os.path.join(model, compile_cache.MODEL_INFO)
    if not compile_cache.enabled() or not os.path.isfile(path):
        return
    try:
        names = _model_info_names(_architectures([model]) or [])
        written = compile_cache.restore_model_info(path, _model_info_dir(), names)
    except Exception as e:  # noqa: BLE001 - a cache must never stop a load
        logger.warning(
            "The shipped model info %s was not used (%s): vLLM inspects the model's class "
            "itself; serialize the model again to replace the file",
            path,
            e,
        )
        return
    if written:
        logger.info(
            "Put the shipped model info of %s into %s (vLLM need not inspect the model's "
            "class in a process of its own)",
            ", ".join(name.removesuffix(".json") for name in written),
            _model_info_dir(),
        )
