"""Plug-in registration: `register()`, which vLLM's ``vllm.general_plugins`` entry point
calls (through `tensorize_vllm_model.plugin`) in every process it starts.

Every place this package touches vLLM, in one list (vLLM 0.32 CPU / 0.33 CUDA):

1. Model loader registry: ``register_model_loader`` installs `loader.TensorizerLoader` under
   ``load_format="tensorizer"`` (replacing vLLM's own tensorizer loader; vLLM's warning
   about that is held back) and `loader.CaptureLoader` under
   ``"tensorize_vllm_model_capture"`` (a serialize's engine). The loaders use vLLM's
   ``initialize_model``, ``process_weights_after_loading``, ``DefaultModelLoader`` and the
   model's own ``load_weights``.
2. **A wrapper around** ``vllm.engine.arg_utils.EngineArgs.create_engine_config``: vLLM's
   method is replaced, once per process, by one that, for ``load_format="tensorizer"``
   only, first fetches a remote model's config and tokenizer (`resolve_remote_model`) and
   checks every rank's file (`check_engine_files`), puts back the model-info entries a
   serialize kept (`compiled.put_back_model_info`; within `resolve_remote_model`, with
   ``TENSORIZE_VLLM_MODEL_OVERLAP=1`` only, `prefetch.start` copies a one-rank remote
   model's tensors while vLLM starts), then calls vLLM's method unchanged.
   Every other load format goes straight to vLLM, after one check (`check_not_converted`):
   a local directory holding only tensorized weights, given to vLLM's default loader, is
   refused with the flag to give.
3. LoRA resolver registry: ``LoRAResolverRegistry.register_resolver`` adds a resolver that
   serves ``lora/<name>`` of the served tensorized model (vLLM asks resolvers only with
   ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).
4. Worker extension: `worker.WorkerExtension`, given to vLLM by its dotted path
   (``worker_extension_cls``, `messages.WORKER_EXTENSION`) by the command line and a
   serialize; its methods run in each worker through ``collective_rpc``.
5. vLLM internals the loaders and workers read: ``vllm.config`` (``VllmConfig``,
   ``ModelConfig``, ``LoadConfig``, ``get_current_vllm_config``,
   ``set_current_vllm_config``), ``vllm.model_executor.model_loader``
   (``DefaultModelLoader``, ``BaseModelLoader``, and the registry's private
   ``_LOAD_FORMAT_TO_MODEL_LOADER``, read to register once),
   ``vllm.model_executor.model_loader.utils`` (``initialize_model``,
   ``process_weights_after_loading``), ``vllm.distributed`` (``parallel_state``,
   ``get_tensor_model_parallel_rank``, ``get_pp_group``), ``vllm.platforms.current_platform``, ``vllm.lora.utils.get_supported_lora_modules``,
   ``vllm.utils.torch_utils.set_default_torch_dtype`` and ``vllm.logger.init_logger``;
   of a fused-MoE layer, ``_map_global_expert_id_to_local_expert_id``,
   ``global_num_experts`` and ``local_num_experts`` (`meta_pass`; a layer without them is
   loaded the slower way); ``vllm.model_executor.models.ModelRegistry.models[arch]
   .load_model_cls()`` (the class's ``packed_modules_mapping``, `engine`) and
   ``._get_cache_filename()`` with ``vllm.envs.VLLM_CACHE_ROOT`` (`compiled`: vLLM's
   model-info cache).
6. A wrapper around ``vllm.compilation.decorators._try_load_aot_compiled_fn``
   (`aot_load.install`): the shipped compile cache is put where vLLM is about to read its AOT
   artifact (`compiled.before_aot_load`), and vLLM's CPU build can load its own AOT cache.
7. vLLM's public API the command line and a serialize drive (`engine`): ``vllm.LLM``,
   ``LLM.collective_rpc``, ``LLM.generate`` with ``SamplingParams``, ``EngineArgs`` (its
   fields and ``add_cli_args``), ``FlexibleArgumentParser``, ``vllm.lora.request.LoRARequest``,
   and, to shut an engine down, ``llm.llm_engine.engine_core.shutdown()`` (an internal:
   ``LLM`` has no public shutdown in vLLM 0.32).

docs/design.md ("The vLLM touchpoints") lists the same; change both together.

`register()` is cheap and safe to call more than once: each step checks whether it is done.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from vllm.logger import init_logger

from ... import storage
from ...config import TensorizerConfig
from ...config.plan import ReadPlan, check_model_directory, resolve_read
from ...core.errors import ConfigError, TensorizeError, entry_point
from ...core.redaction import scrub_records, scrubbing
from ...format.record import ParallelLayout
from ...inspection.checks import check_shards
from ...read import prefetch
from . import aot_load
from .compiled import put_back_model_info
from .engine import parallel_sizes, refusal_text
from .messages import CAPTURE_LOAD_FORMAT, LOAD_FORMAT

__all__ = [
    "register",
    "check_engine_files",
    "check_not_converted",
    "resolve_remote_model",
    "served",
]

logger = scrubbing(init_logger(f"vllm.{__name__}"))

# Per process that configures engines: the tensorizer config of each served model name
# (for the LoRA resolver in an API server process).
served: dict[str, TensorizerConfig] = {}


def register() -> None:
    """Install this package's loaders, engine hook and LoRA resolver in vLLM (idempotent,
    cheap)."""
    scrub_records("vllm")  # vLLM's own lines (its config: model='https://...?sig=...') too
    _register_loaders()
    _install_engine_hook()
    _register_lora_resolver()
    aot_load.install()
    logger.debug("load_format=%r is served by tensorize_vllm_model", LOAD_FORMAT)


def _register_loaders() -> None:
    """vLLM warns when a load format is registered over a built-in one; replacing vLLM's own
    tensorizer loader is the point of this plug-in, so that warning is held back."""
    from vllm.model_executor.model_loader import (
        _LOAD_FORMAT_TO_MODEL_LOADER,
        register_model_loader,
    )

    from .loader import CaptureLoader, TensorizerLoader

    registry_logger = logging.getLogger("vllm.model_executor.model_loader")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        for name, loader in ((LOAD_FORMAT, TensorizerLoader), (CAPTURE_LOAD_FORMAT, CaptureLoader)):
            if _LOAD_FORMAT_TO_MODEL_LOADER.get(name) is not loader:
                register_model_loader(name)(loader)
    finally:
        registry_logger.setLevel(level)


def _install_engine_hook() -> None:
    """Wrap ``EngineArgs.create_engine_config`` (touchpoint 2 above) so that two steps run
    in the caller's process when an engine with ``load_format="tensorizer"`` is configured,
    before vLLM starts any engine or worker process:

    * `resolve_remote_model`: ``LLM("s3://bucket/.../v1", load_format="tensorizer")`` and
      ``vllm serve s3://...`` work;
    * `check_engine_files`: every rank's file is checked (exists, decrypts, fits the
      layout), so a missing shard or a wrong key fails in seconds with a clear message.
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_tensorize_vllm_model", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.load_format != LOAD_FORMAT:
            with entry_point("LLM"), _one_line_if(_serving()):
                check_not_converted(self)
            return original(self, *args, **kwargs)
        serving = _serving()
        with entry_point("vllm serve" if serving else "LLM"), _one_line_if(serving):
            resolve_remote_model(self)
            check_engine_files(self)
            put_back_model_info(str(self.model))
            return original(self, *args, **kwargs)

    create_engine_config._tensorize_vllm_model = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


# vLLM's loaders that read the Hugging Face weight files of the model directory
_WEIGHT_FORMATS = ("auto", "safetensors", "pt")


def check_not_converted(engine_args: Any) -> None:
    """Refuse, with the flag to give, a local model directory that holds this package's
    tensors (``model.tensors``, ``model-rank-*.tensors``) and no Hugging Face weights when
    vLLM's default loader is asked to load it (it would fail with "Cannot find any model
    weights").

    Raises:
        ConfigError: naming the directory and ``load_format="tensorizer"``.
    """
    model = str(engine_args.model)
    if str(engine_args.load_format) not in _WEIGHT_FORMATS or not os.path.isdir(model):
        return
    names = os.listdir(model)
    if any(n.endswith(".tensors") for n in names) and not any(
        n.endswith((".safetensors", ".bin", ".pt")) for n in names
    ):
        raise ConfigError(
            f"{model} holds tensorized weights (model.tensors) and no Hugging Face weights: "
            f'load it with load_format="{LOAD_FORMAT}" (vllm serve: --load-format {LOAD_FORMAT})'
        )


def _serving() -> bool:
    """Whether this process is vLLM's command line (``vllm serve``), not a user's script."""
    return "vllm.entrypoints.cli.main" in sys.modules


@contextlib.contextmanager
def _one_line_if(serving: bool) -> Iterator[None]:
    """Under ``vllm serve``, this package's refusal of the model's files (bad input, not a
    bug) is one ``error: ...`` line and exit code 2, as on this package's command line,
    rather than a traceback through vLLM's server start-up; so is vLLM's own refusal of
    the engine flags (a ``ValueError``) when it serves with ``--load-format tensorizer``.
    A script's ``LLM(...)`` gets the exception."""
    try:
        yield
    except TensorizeError as e:
        if not serving:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except ValueError as e:  # vLLM's own validation of the engine flags (pydantic's)
        if not serving:
            raise
        print(f"error: vLLM refused the engine flags: {refusal_text(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def _extra_config(engine_args: Any) -> dict[str, Any]:
    extra = engine_args.model_loader_extra_config
    if hasattr(extra, "to_serializable"):
        extra = extra.to_serializable()
    return dict(extra or {})


def check_engine_files(engine_args: Any) -> None:
    """Check the files an engine will load (see `checks.check_shards`), as the read plan
    of its layout names them."""
    extra = _extra_config(engine_args)
    config = TensorizerConfig.from_extra_config({"tensorizer_dir": str(engine_args.model), **extra})
    check_model_directory(config)
    tp, pp = parallel_sizes(engine_args)
    plan = resolve_read(config, ParallelLayout(tp, pp))
    if plan.shared:
        _check_shared_file(plan, str(engine_args.model))
    else:
        check_shards(plan.file_config(), tp, pp)
    names = engine_args.served_model_name or [str(engine_args.model)]
    names = [names] if isinstance(names, str) else list(names)
    # For the LoRA resolver in this (API server) process, which vLLM asks with the engine's
    # model path: a remote model's is the local copy of its config (resolve_remote_model).
    for name in {*names, str(engine_args.model)}:
        served[name] = config


def _check_shared_file(plan: ReadPlan, model: str) -> None:
    """One file for every rank: it must hold whole weights (a converted file, or a file that
    is not vLLM-tensorized such as a Hugging Face model's; see `plan.check_shared_file`),
    and the model must split at this layout."""
    from ...convert.fit import check_layout_fits

    tp, pp = plan.layout.tensor_parallel_size, plan.layout.pipeline_parallel_size
    check_shards(plan.file_config(), tp, pp)
    config_path = os.path.join(model, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            check_layout_fits(json.load(f), tp, pp, source=model)


def resolve_remote_model(engine_args: Any) -> None:
    """For ``load_format="tensorizer"`` with an ``s3://`` or ``http(s)://`` ``--model``:
    fetch the config/tokenizer files to the local cache, serve the model from there under
    its remote name, and give the loader the remote directory.

    vLLM 0.32 hands an object-storage model path to Run:ai's streamer to pull its config,
    then refuses every load format but Run:ai's own; this runs before vLLM builds its
    config (see `artifacts.remote_files.fetch_model_files`).
    """
    model = str(engine_args.model or "")
    if engine_args.load_format != LOAD_FORMAT or storage.local_path(model) is not None:
        return
    from ...artifacts.remote_files import fetch_model_files

    extra = _extra_config(engine_args)
    config = TensorizerConfig.from_extra_config({**extra, "tensorizer_dir": model})
    local = fetch_model_files(model, config.options)
    logger.info("Fetched the config and tokenizer of %s into %s", storage.redact(model), local)
    if not extra.get("tensorizer_uri"):
        extra["tensorizer_dir"] = model
    engine_args.model_loader_extra_config = extra
    if engine_args.tokenizer in (None, "", model):
        engine_args.tokenizer = local
    if not engine_args.served_model_name:
        engine_args.served_model_name = model
    engine_args.model = local
    if (
        prefetch.enabled() and parallel_sizes(engine_args) == (1, 1) and config.given_uri is None
    ):  # the weights stream in while vLLM starts up (read/prefetch.py)
        prefetch.start(resolve_read(config, ParallelLayout()).uri, config.options)


def _register_lora_resolver() -> None:
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    if "tensorize_vllm_model" in LoRAResolverRegistry.get_supported_resolvers():
        return

    class TensorizedLoRAResolver(LoRAResolver):
        """Serves ``lora/<name>`` of the tensorized model being served, by name.

        vLLM asks resolvers only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
        """

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            from ...artifacts.lora import adapter_uri
            from .module_api import tensorized_lora_request

            config = served.get(base_model_name)
            model = (config.tensorizer_dir if config else None) or base_model_name
            options = config.options if config else None
            try:
                uri = adapter_uri(model, lora_name)
                if not storage.exists(storage.join(uri, "adapter_config.json"), options):
                    return None
            except Exception:  # noqa: BLE001 - not ours to resolve
                return None
            return tensorized_lora_request(model, lora_name, tensorizer_config=config)

    LoRAResolverRegistry.register_resolver("tensorize_vllm_model", TensorizedLoRAResolver())
