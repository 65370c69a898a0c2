"""vLLM's side of the shipped compile cache (`compile_cache`): which local directories hold
a worker's compiled artifacts, and the key they depend on.

vLLM 0.32-0.34 with torch >= 2.10 compile "AOT" by default (``VLLM_USE_AOT_COMPILE``): each
compiled module (``@support_torch_compile``, e.g. Llama's backbone) is saved under
``$VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<hash>/`` as ``rank_<i>_<j>/model``,
and vLLM points ``TORCHINDUCTOR_CACHE_DIR`` at ``<hash>/inductor_cache/`` (read in
``vllm/compilation/decorators.py``). ``<hash>`` covers vLLM's compile-environment factors,
``VllmConfig.compute_hash()`` (which includes the model's *path*) and the module's forward
(its qualified name and line). A serialize's engine loads the checkpoint's directory and a
load the tensorized one, so the two hashes differ by the path alone: the capture side packs
its own directory and the load side writes into the one its engine is about to use, both
computed here as vLLM computes them, after checking that the `compile_cache.CacheKey`
(every factor but the path) is equal.

Nothing is shipped or restored when the engine does not compile (``enforce_eager``, LoRA on
CPU), when ``VLLM_DISABLE_COMPILE_CACHE=1`` or ``VLLM_USE_AOT_COMPILE=0``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.logger import init_logger

from .. import compile_cache, storage
from ..compile_cache import CacheKey
from .runtime import current_layout, dtype_name

__all__ = ["cache_key", "entries", "pack_for_save", "restore_for_load"]

logger = init_logger(f"vllm.{__name__}")


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
        dtype=dtype_name(vllm_config.model_config.dtype),
        tensor_parallel_size=layout.tensor_parallel_size,
        pipeline_parallel_size=layout.pipeline_parallel_size,
        rank=layout.rank,
        config_hash=config_hash(vllm_config),
    )


def _compiled_modules(model: nn.Module) -> list[tuple[str, Any]]:
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    return [
        (name or "root", module)
        for name, module in model.named_modules()
        if isinstance(module, TorchCompileWithNoGuardsWrapper)
        and not getattr(module, "do_not_compile", False)
    ]


def _uses_aot_cache() -> bool:
    from vllm import envs

    return bool(envs.VLLM_USE_AOT_COMPILE) and not envs.VLLM_DISABLE_COMPILE_CACHE


def entries(vllm_config: Any, model: nn.Module) -> dict[str, str]:
    """Entry name -> local directory, for every compiled module of `model`: its
    ``inductor_cache`` and its ``rank_<i>_<j>`` directory (vLLM's AOT layout, above); empty
    when nothing is compiled or cached."""
    if not _uses_aot_cache() or vllm_config.compilation_config.mode in (None, 0):
        return {}
    from vllm import envs
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.compilation.decorators import _model_hash_key

    parallel = vllm_config.parallel_config
    rank_dir = f"rank_{parallel.rank}_{parallel.data_parallel_index}"
    found: dict[str, str] = {}
    for name, module in _compiled_modules(model):
        factors = [*aot_compile_hash_factors(vllm_config), _model_hash_key(module.forward)]
        digest = hashlib.sha256(str(factors).encode()).hexdigest()
        root = os.path.join(
            envs.VLLM_CACHE_ROOT, "torch_compile_cache", "torch_aot_compile", digest
        )
        found[f"{name}.inductor_cache"] = os.path.join(root, "inductor_cache")
        found[f"{name}.rank"] = os.path.join(root, rank_dir)
    return found


def pack_for_save(
    vllm_config: Any,
    model: nn.Module,
    tensors: Iterable[tuple[str, Any]],
    tensors_uri: str,
    tx: storage.Transaction,
) -> str | None:
    """Stage this rank's compile cache in `tx` beside `tensors_uri`: the archive's URI, or
    None when there is nothing to ship (or it would hold weight bytes: then said, and not
    shipped)."""
    if not compile_cache.enabled():
        return None
    found = {k: v for k, v in entries(vllm_config, model).items() if os.path.isdir(v)}
    if not any(k.endswith(".rank") for k in found):
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
    key = cache_key(vllm_config)
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


def restore_for_load(
    vllm_config: Any, model: nn.Module, tensors_uri: str, options: storage.Options
) -> int | None:
    """Put this rank's shipped compile cache (if any, and if its key matches) into the local
    directories this engine's compile is about to read: the number of files written, None
    when none was used. Never fails the load: a problem is logged and vLLM compiles."""
    if not compile_cache.enabled():
        return None
    targets = entries(vllm_config, model)
    if not targets:
        return None
    key = cache_key(vllm_config)
    uri = compile_cache.archive_uri(tensors_uri, key.rank)
    try:
        if not storage.exists(uri, options):
            return None
        data = storage.read_bytes(uri, options, limit=compile_cache.ARCHIVE_LIMIT)
        written = compile_cache.restore(key, compile_cache.read_archive(data, uri), targets)
    except Exception as e:  # noqa: BLE001 - a cache must never stop a load
        logger.warning("The shipped compile cache %s was not used: %s", storage.redact(uri), e)
        return None
    if written is not None:
        logger.info(
            "Put the shipped compile cache of %s into the local cache (%d files new)",
            storage.redact(uri),
            written,
        )
    return written
