"""Everything that touches vLLM's internals, in one place (a vLLM upgrade changes this file).

* `TensorizerLoader`: the model loader for ``load_format="tensorizer"``. It builds the model
  with its parameters on the meta device (no memory, no initialisation), streams the tensors
  onto the worker's device (``cuda:N`` or ``cpu``), then runs vLLM's weight post-processing.
* `CaptureLoader`: used only while serializing. It loads the checkpoint with vLLM's default
  loader and keeps the weights as they are *before* post-processing (vLLM's CPU backend
  repacks linear weights and drops the originals), for the worker extension to write.
* `WorkerExtension`: methods that ``collective_rpc`` calls in every worker: write this
  rank's tensors to a staged file, commit or abort, report the last load's figures.
* `register()`: installs the loaders (the ``vllm.general_plugins`` entry point calls it in
  every vLLM process, through `tensorize_vllm_model.plugin`).
* `Engine` and the argument-parser helpers the command line uses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import (
    BaseModelLoader,
    DefaultModelLoader,
    register_model_loader,
)
from vllm.model_executor.model_loader.utils import (
    initialize_model,
    process_weights_after_loading,
)
from vllm.utils.torch_utils import set_default_torch_dtype

from . import errors, prefetch, storage
from . import layout as layout_mod
from .config import TensorizerConfig, as_tensorizer_config
from .errors import ConfigError, ModelMismatchError, TensorizeError
from .layout import FileRecord, ParallelLayout
from .progress import progress
from .serialization import write_tensors
from .streaming import (
    LoadStats,
    check_shards,
    default_num_readers,
    load_into_module,
    meta_parameters,
    open_tensors,
)

# Under vLLM's namespace, so that vLLM's logging configuration shows these lines.
logger = init_logger(f"vllm.{__name__}")

LOAD_FORMAT = "tensorizer"
CAPTURE_LOAD_FORMAT = "tensorize_vllm_model_capture"
WORKER_EXTENSION = "tensorize_vllm_model.vllm_adapter.WorkerExtension"

# Per worker process: the weights captured before post-processing (serialize), the
# transaction holding the staged files not yet committed (rolled back at process exit if
# still open), and the figures of the last load.
_captured: dict[str, Any] | None = None
_transaction: storage.Transaction | None = None
_last_load: LoadStats | None = None
# Per worker process: the byte ranges the last load of a converted file read.
_last_parts: list[tuple[str, int, int]] = []
# Per process that configures engines: the tensorizer config of each served model name.
_served: dict[str, TensorizerConfig] = {}


def register() -> None:
    """Install this package's loaders in vLLM's registry (idempotent, cheap).

    vLLM warns when a load format is registered over a built-in one; replacing vLLM's own
    tensorizer loader is the point of this plug-in, so that warning is held back.
    """
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER

    registry_logger = logging.getLogger("vllm.model_executor.model_loader")
    level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        for name, loader in ((LOAD_FORMAT, TensorizerLoader), (CAPTURE_LOAD_FORMAT, CaptureLoader)):
            if _LOAD_FORMAT_TO_MODEL_LOADER.get(name) is not loader:
                register_model_loader(name)(loader)
    finally:
        registry_logger.setLevel(level)
    _install_engine_hook()
    _register_lora_resolver()
    logger.debug("load_format=%r is served by tensorize_vllm_model", LOAD_FORMAT)


# -- remote model directories ---------------------------------------------------------------


def _install_engine_hook() -> None:
    """Run two steps in the caller's process when an engine with ``load_format="tensorizer"``
    is configured, before vLLM starts any engine or worker process:

    * `check_engine_files`: every rank's file is checked (exists, decrypts, fits the
      layout), so a missing shard or a wrong key fails in seconds with a clear message;
    * `resolve_remote_model`: ``LLM("s3://bucket/.../v1", load_format="tensorizer")`` and
      ``vllm serve s3://...`` work.

    vLLM 0.32 hands an object-storage model path to Run:ai's streamer to pull its config,
    then refuses every load format but Run:ai's own. Before vLLM builds its config, this
    fetches the small files of a remote tensorized model into a local cache (see
    `artifacts.fetch_model_files`) and points ``--model`` there, while the loader streams
    the tensors from the remote directory. Only ``load_format="tensorizer"`` with a remote
    ``--model`` is touched; everything else goes to vLLM unchanged.
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_tensorize_vllm_model", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args: Any, **kwargs: Any):
        if self.load_format == LOAD_FORMAT:
            resolve_remote_model(self)
            check_engine_files(self)
        return original(self, *args, **kwargs)

    create_engine_config._tensorize_vllm_model = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def check_engine_files(engine_args: Any) -> None:
    """Check the files an engine will load (see `streaming.check_shards`)."""
    extra = engine_args.model_loader_extra_config
    if hasattr(extra, "to_serializable"):
        extra = extra.to_serializable()
    extra = dict(extra or {})
    config = TensorizerConfig.from_extra_config({"tensorizer_dir": str(engine_args.model), **extra})
    tp, pp = parallel_sizes(engine_args)
    shared = shared_file(config, _has_explicit_uri(extra), tp * pp)
    if not _has_explicit_uri(extra):
        config.tensorizer_uri = layout_mod.tensors_uri(config.tensorizer_dir or ".", tp * pp)
    if shared is not None:
        _check_shared_file(shared, config, str(engine_args.model), tp, pp)
    else:
        check_shards(config, tp, pp)
    names = engine_args.served_model_name or [str(engine_args.model)]
    for name in [names] if isinstance(names, str) else names:
        _served[name] = config  # for the LoRA resolver in this (API server) process


def _check_shared_file(uri: str, config: TensorizerConfig, model: str, tp: int, pp: int) -> None:
    """One file for every rank: it must hold whole weights (a converted file, or a file that
    is not vLLM-tensorized such as a Hugging Face model's; see `layout.check_shared_file`),
    and the model must split at this layout."""
    import json

    from .convert.fit import check_layout_fits

    check_shards(dataclasses.replace(config, tensorizer_uri=uri), tp, pp)
    config_path = os.path.join(model, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            check_layout_fits(json.load(f), tp, pp, source=model)


def resolve_remote_model(engine_args: Any) -> None:
    """For ``load_format="tensorizer"`` with an ``s3://`` or ``http(s)://`` ``--model``:
    fetch the config/tokenizer files to the local cache, serve the model from there under
    its remote name, and give the loader the remote directory."""
    model = str(engine_args.model or "")
    if engine_args.load_format != LOAD_FORMAT or storage.local_path(model) is not None:
        return
    from .artifacts import fetch_model_files

    extra = engine_args.model_loader_extra_config
    if hasattr(extra, "to_serializable"):
        extra = extra.to_serializable()
    extra = dict(extra or {})
    config = TensorizerConfig.from_extra_config({**extra, "tensorizer_dir": model})
    local = fetch_model_files(model, config.stream_options())
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
        prefetch.enabled()
        and parallel_sizes(engine_args) == (1, 1)
        and not extra.get("tensorizer_uri")
    ):  # the weights stream in while vLLM starts up (prefetch.py)
        prefetch.start(layout_mod.tensors_uri(model, 1), config.stream_options())


# -- facts about the running worker ---------------------------------------------------------


def current_layout(vllm_config: VllmConfig) -> ParallelLayout:
    """This worker's place in the tensor/pipeline-parallel layout."""
    parallel = vllm_config.parallel_config
    tp_rank = pp_rank = 0
    if parallel.world_size > 1:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        tp_rank = get_tensor_model_parallel_rank()
        pp_rank = get_pp_group().rank_in_group
    return ParallelLayout(
        tensor_parallel_size=parallel.tensor_parallel_size,
        pipeline_parallel_size=parallel.pipeline_parallel_size,
        tp_rank=tp_rank,
        pp_rank=pp_rank,
    )


def target_device(vllm_config: VllmConfig) -> torch.device:
    """The device this worker's weights go to, with its index (``cuda:N``, ``cpu``)."""
    load_device = vllm_config.load_config.device or vllm_config.device_config.device
    device = torch.device(load_device)
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return device


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


# -- the tensorizer loader ------------------------------------------------------------------


class TensorizerLoader(BaseModelLoader):
    """Loads ``load_format="tensorizer"`` models with this package's streaming core."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self._explicit_uri = _has_explicit_uri(load_config.model_loader_extra_config)
        self.tensorizer_config = TensorizerConfig.from_extra_config(
            load_config.model_loader_extra_config
        )

    def rank_uri(self, vllm_config: VllmConfig) -> str:
        """The file this worker reads: its rank's file, or the one file every rank shares
        (`_open_checked` checks that it may be shared)."""
        layout = current_layout(vllm_config)
        shared = shared_file(self.tensorizer_config, self._explicit_uri, layout.world_size)
        if shared is not None:
            return shared
        uri = self.tensorizer_config.tensorizer_uri
        assert uri is not None
        if not self._explicit_uri:
            uri = layout_mod.tensors_uri(
                self.tensorizer_config.tensorizer_dir or ".", layout.world_size
            )
        return layout_mod.rank_uri(uri, layout)

    def _open_checked(self, vllm_config: VllmConfig, device: torch.device | str):
        """Open this worker's file and check that it fits the layout: (uri, reader)."""
        layout = current_layout(vllm_config)
        shared = shared_file(self.tensorizer_config, self._explicit_uri, layout.world_size)
        uri = shared or self.rank_uri(vllm_config)
        source = prefetch.local_copy(uri) or uri  # the copy made during the start-up
        reader = open_tensors(source, device=device, config=self.tensorizer_config)
        try:
            if shared is not None:
                layout_mod.check_shared_file(
                    shared, layout, vllm_tensorized=reader.is_vllm_tensorized, record=reader.record
                )
            if reader.record is not None and not reader.checkpoint_form:
                reader.record.check_layout(layout, source=uri)
        except BaseException:
            reader.close()
            raise
        return uri, reader

    def download_model(self, model_config: ModelConfig) -> None:
        uri = self.tensorizer_config.tensorizer_uri
        assert uri is not None
        uri = layout_mod.rank_uri(uri, ParallelLayout(), shared=True)  # rank 0's file
        if storage.local_path(uri) is not None and not storage.exists(uri):
            raise ConfigError(f"no such tensors file: {uri}")

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        global _last_load
        layout = current_layout(vllm_config)
        device = target_device(vllm_config)
        with _readers_on_every_core(device):
            uri, reader = self._open_checked(vllm_config, device)
            logger.info("Loading tensors from %s onto %s", uri, device)
            with reader, set_default_torch_dtype(model_config.dtype):
                building = time.perf_counter()
                with torch.device(device), contextlib.ExitStack() as stack:
                    if reader.is_vllm_tensorized:
                        stack.enter_context(meta_parameters(device))
                    model = initialize_model(
                        vllm_config=vllm_config, model_config=model_config, prefix=prefix
                    )
                reader.started += time.perf_counter() - building  # time the reading only
                with progress(
                    "Deserializing",
                    reader.total_tensor_bytes,
                    logger=logger,
                    enabled=layout.rank == 0,
                ) as reader.on_bytes:
                    if reader.is_vllm_tensorized:
                        stats = load_into_module(model, reader)
                    elif reader.checkpoint_form:
                        stats = self._load_converted(model, reader, uri, device)
                    else:
                        stats = self._load_hf_weights(model, reader)
        _last_load = stats
        prefetch.release(uri)
        logger.info(
            "Deserialized %.3f GB in %.2f s (%.2f GB/s) from %s (%sworker memory: %s)",
            stats.bytes / 1e9,
            stats.seconds,
            stats.gb_per_s,
            uri,
            f"{stats.read_times}; " if stats.read_times else "",
            _memory(),
        )
        gc.collect()
        process_weights_after_loading(model, model_config, device)
        logger.info("vLLM's weight post-processing done (worker memory: %s)", _memory())
        return model.eval()

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Reload weights into an already built model (vLLM's in-place reload)."""
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        device = next(model.parameters()).device
        uri, reader = self._open_checked(vllm_config, device)
        with reader:
            if reader.is_vllm_tensorized:
                load_into_module(model, reader)
            elif reader.checkpoint_form:
                self._load_converted(model, reader, uri, device)
            else:
                self._load_hf_weights(model, reader)

    def _load_converted(
        self, model: nn.Module, reader, uri: str, device: torch.device
    ) -> LoadStats:
        """A converted file (checkpoint form): vLLM's ``load_weights`` is first run on meta
        tensors to learn which bytes of each tensor this rank copies (`convert.regions`),
        then fed tensors with only those bytes read (`convert.loading`)."""
        from .convert.loading import ConvertedFile
        from .convert.partial_read import PartsRead
        from .convert.regions import CopyWatch

        threads = self.tensorizer_config.num_readers or default_num_readers(uri, "cpu")
        converted = ConvertedFile(reader, uri, self.tensorizer_config, threads)
        watch = CopyWatch()
        with _naming_tensor(reader, watch), watch:
            loaded = model.load_weights(converted.meta_inputs(watch))
        _check_all_loaded(model, loaded, reader)
        parts = converted.parts(watch.needs)
        _last_parts[:] = [
            (p.name, p.entry.data_offset + p.span[0], p.entry.data_offset + p.span[1])
            for p in parts
        ]
        read = PartsRead()
        with _naming_tensor(reader, watch):
            model.load_weights(converted.tensors(parts, read))
        return LoadStats(
            uri=reader.uri,
            tensors=len(parts),
            bytes=read.bytes,
            seconds=time.perf_counter() - reader.started,
        )

    @staticmethod
    def _load_hf_weights(model: nn.Module, reader) -> LoadStats:
        """A file of a Hugging Face model (not vLLM-tensorized): through vLLM's name
        mapping, leaving out the buffers (such as ``rotary_emb.inv_freq``) vLLM's model
        does not have."""
        kinds = reader.tensor_types()
        count = nbytes = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count, nbytes
            for name, tensor in reader.items():
                if kinds.get(name) == "BUFFER":
                    continue
                count += 1
                nbytes += tensor.numel() * tensor.element_size()
                yield name, tensor

        model.load_weights(weights())
        return LoadStats(
            uri=reader.uri,
            tensors=count,
            bytes=nbytes,
            seconds=time.perf_counter() - reader.started,
            read_times=reader.read_times,
        )


@contextlib.contextmanager
def _naming_tensor(reader, watch) -> Iterator[None]:
    """vLLM's ``load_weights`` fails with a bare KeyError or ValueError on a tensor its
    model does not have: name the tensor, the file and the architecture instead."""
    try:
        yield
    except (KeyError, ValueError, AssertionError, AttributeError) as e:
        tensor = watch.current.name if watch.current else "?"
        architecture = reader.record.architecture if reader.record else "?"
        raise ModelMismatchError(
            f"vLLM cannot load the checkpoint in {reader.uri} for this model: tensor "
            f"{tensor} was refused by vLLM's {architecture} ({type(e).__name__}: {e})"
        ) from None


def _check_all_loaded(model: nn.Module, loaded: Any, reader) -> None:
    """As vLLM's default loader: every parameter must have been filled from the file."""
    if loaded is None:
        return
    missing = sorted(set(dict(model.named_parameters())) - set(loaded))
    if missing:
        raise ModelMismatchError(
            f"{reader.uri} does not hold every weight vLLM's "
            f"{type(model).__name__} needs; missing: {', '.join(missing)}"
        )


def shared_file(config: TensorizerConfig, explicit: bool, world_size: int) -> str | None:
    """The one file every rank reads, at more than one rank: an explicit
    ``tensorizer_uri`` without a rank template, or a directory's ``model.tensors`` when it
    has no rank files. Whether that file is a converted one is checked when it is opened
    (`check_engine_files`, the loader). None: one file per rank."""
    if world_size == 1:
        return None
    uri = config.tensorizer_uri
    assert uri is not None
    if explicit:
        return None if layout_mod.has_rank_template(uri) else uri
    directory = config.tensorizer_dir or "."
    options = config.stream_options()
    single = layout_mod.tensors_uri(directory, 1)
    if storage.exists(
        layout_mod.tensors_uri(directory, world_size) % 0, options
    ) or not storage.exists(single, options):
        return None
    return single


def _has_explicit_uri(extra: Any) -> bool:
    extra = dict(extra or {})
    nested = extra.get("tensorizer_config") or {}
    return bool(extra.get("tensorizer_uri") or nested.get("tensorizer_uri"))


# -- serializing: capture the weights, then write them from each worker ---------------------


class CaptureLoader(DefaultModelLoader):
    """vLLM's default loader that also keeps the loaded weights for serialization.

    The weights are kept as references taken before ``process_weights_after_loading``, so
    what is written is what the checkpoint gave, in vLLM's own parameter names and shards,
    whatever the backend does to them afterwards.
    """

    def __init__(self, load_config: LoadConfig):
        extra = dict(load_config.model_loader_extra_config or {})
        source_format = extra.pop("source_load_format", "auto")
        super().__init__(
            dataclasses.replace(
                load_config, load_format=source_format, model_loader_extra_config={}
            )
        )

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        global _captured
        super().load_weights(model, model_config)
        tensors = [(name, p.detach(), False) for name, p in model.named_parameters()]
        tensors += [(name, b.detach(), True) for name, b in model.named_buffers()]
        _captured = {
            "tensors": tensors,
            "architecture": type(model).__name__,
            "dtype": _dtype_name(model_config.dtype),
        }


@contextlib.contextmanager
def _readers_on_every_core(device: torch.device | str) -> Iterator[None]:
    """Let the loader's reader threads run on every core while the weights load.

    vLLM's CPU backend binds each worker to its OpenMP cores and reserves the others for its
    engine processes, which wait idle during the load; on a small machine that leaves the
    readers one core. Threads inherit the mask of the thread that starts them, so widening
    this thread's mask for the load (and restoring it after) reaches the readers and nothing
    else: vLLM's OpenMP threads keep their binding.
    """
    if torch.device(device).type != "cpu" or not hasattr(os, "sched_setaffinity"):
        yield
        return
    try:
        bound = os.sched_getaffinity(0)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # a cpuset that forbids it: keep vLLM's binding
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, bound)


# The key of a worker's answer that carries one of this package's errors (see `_reported`).
WORKER_ERROR = "tensorize_vllm_model_error"


def _reported(method):
    """Have a worker method answer with this package's error instead of raising it: vLLM
    logs a worker's exception with its traceback and re-raises it in the caller as a bare
    RuntimeError; `Engine.rpc` raises the answer again, as the error it was."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except TensorizeError as e:
            return {WORKER_ERROR: str(e), "kind": type(e).__name__}

    return wrapper


def _raise_worker_errors(answers: list[Any]) -> list[Any]:
    for answer in answers:
        if isinstance(answer, dict) and WORKER_ERROR in answer:
            kind = getattr(errors, answer.get("kind", ""), None)
            if (
                not (isinstance(kind, type) and issubclass(kind, TensorizeError))
                or kind is errors.CorruptTensorError
            ):
                kind = TensorizeError
            raise kind(answer[WORKER_ERROR])
    return answers


class WorkerExtension:
    """Methods vLLM mixes into its worker class, called through ``collective_rpc``."""

    @_reported
    def tensorize_vllm_model_save(self, request: dict[str, Any]) -> dict[str, Any]:
        """Write this rank's captured weights to a staged file; return what was written."""
        global _captured, _transaction
        if _captured is None:
            raise RuntimeError(
                "no captured weights in this worker: the engine was not started with "
                f"load_format={CAPTURE_LOAD_FORMAT!r}"
            )
        layout = current_layout(self.vllm_config)  # type: ignore[attr-defined]
        uri = layout_mod.rank_uri(request["tensorizer_uri"], layout)
        key = request.get("key")
        record = FileRecord(
            architecture=_captured["architecture"],
            dtype=_captured["dtype"],
            tensor_parallel_size=layout.tensor_parallel_size,
            pipeline_parallel_size=layout.pipeline_parallel_size,
            rank=layout.rank,
            producer=request.get("producer", ""),
        )
        tensors = _captured["tensors"]
        total = sum(t.numel() * t.element_size() for _, t, _ in tensors)
        if _transaction is None or _transaction.closed:
            _transaction = storage.transaction(request.get("stream_options"))
        with progress("Serializing", total, logger=logger, enabled=layout.rank == 0) as advance:
            staged = write_tensors(
                uri,
                tensors,
                record=record,
                key=key,
                serialization_kwargs=request.get("serialization_kwargs") or {},
                on_bytes=advance,
                tx=_transaction,
            )
        _captured = None
        return {"rank": layout.rank, "uri": uri, "tensors": staged.tensors, "bytes": staged.bytes}

    @_reported
    def tensorize_vllm_model_commit(self) -> list[str]:
        """Publish this worker's staged files under their final names."""
        global _transaction
        tx, _transaction = _transaction, None
        if tx is None:
            return []
        tx.commit()
        return tx.uris

    def tensorize_vllm_model_abort(self) -> None:
        """Delete this worker's staged files."""
        global _transaction
        tx, _transaction = _transaction, None
        if tx is not None:
            tx.rollback()

    def tensorize_vllm_model_lora_modules(self) -> dict[str, Any]:
        """The module names a LoRA adapter may target in this model (PEFT's names, packed
        modules unpacked), and the engine's --max-lora-rank when LoRA is enabled."""
        from vllm.lora.utils import get_supported_lora_modules

        model = self.get_model()  # type: ignore[attr-defined]
        packed = getattr(model, "packed_modules_mapping", {}) or {}
        # With --enable-lora vLLM has already wrapped each layer (".../qkv_proj.base_layer").
        supported = set(get_supported_lora_modules(model)) - {"base_layer"}
        supported |= {
            name.rsplit(".", 2)[-2]
            for name, _ in model.named_modules()
            if name.endswith(".base_layer")
        }
        expected: set[str] = set()
        for module in supported:
            expected.update(packed.get(module, [module]))
        lora_config = self.vllm_config.lora_config  # type: ignore[attr-defined]
        return {
            "modules": sorted(expected),
            "max_rank": lora_config.max_lora_rank if lora_config else None,
        }

    def tensorize_vllm_model_read_plan(self) -> list[tuple[str, int, int]]:
        """(tensor, first byte, end byte) in the file of every range the last load of a
        converted file read on this rank."""
        return list(_last_parts)

    def tensorize_vllm_model_load_stats(self) -> dict[str, Any] | None:
        """Figures of the last tensorizer load in this worker."""
        if _last_load is None:
            return None
        return dataclasses.asdict(_last_load)


# -- engines and arguments, for the command line --------------------------------------------


def make_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """vLLM's argument parser with every engine flag (``--model``, ``--dtype``...).

    Usage errors print one line, ``<prog>: error: <message>``, and exit with code 2.
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class OneLineErrorParser(FlexibleArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            self.exit(2, f"{self.prog}: error: {message}\n")

    parser = OneLineErrorParser(**kwargs)
    return EngineArgs.add_cli_args(parser)


def engine_args_from_namespace(args: argparse.Namespace):
    """The `EngineArgs` given on the command line."""
    from vllm.engine.arg_utils import EngineArgs

    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EngineArgs)
        if hasattr(args, f.name)
    }
    return EngineArgs(**values)


def parallel_sizes(engine_args) -> tuple[int, int]:
    return int(engine_args.tensor_parallel_size or 1), int(engine_args.pipeline_parallel_size or 1)


class Engine:
    """A vLLM engine (`vllm.LLM`) started for one job, shut down by `close()`."""

    def __init__(self, engine_args, **overrides: Any):
        from vllm import LLM

        values = dict(vars(engine_args))
        values.update(overrides)
        self.llm = LLM(**values)

    @classmethod
    def for_capture(cls, engine_args, source_load_format: str) -> Engine:
        return cls(
            engine_args,
            load_format=CAPTURE_LOAD_FORMAT,
            model_loader_extra_config={"source_load_format": source_load_format},
            worker_extension_cls=WORKER_EXTENSION,
        )

    def rpc(self, method: str, **kwargs: Any) -> list[Any]:
        """`method` on every worker (vLLM's ``collective_rpc``): their answers.

        Raises:
            TensorizeError: a worker's error from this package (as raised there), or
                `errors.WorkerError` for any other failure of the call, with vLLM's message.
        """
        try:
            answers = self.llm.collective_rpc(method, kwargs=kwargs)
        except Exception as e:  # noqa: BLE001 - vLLM raises bare RuntimeError/Exception
            raise errors.WorkerError(f"the engine's {method} call failed: {e}") from e
        return _raise_worker_errors(answers)

    def rpc_within(self, seconds: float, method: str, **kwargs: Any) -> list[Any] | None:
        """`rpc`, giving up after `seconds` (None then, or on error): for clean-up calls to
        an engine that may already be shutting down."""
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(self.rpc(method, **kwargs)), daemon=True
        )
        thread.start()
        thread.join(seconds)
        if thread.is_alive() or not result:
            logger.warning("the engine did not answer %s within %.0f s", method, seconds)
            return None
        return result[0]

    def generate(
        self, prompts: Sequence[str], *, max_tokens: int = 16
    ) -> list[tuple[str, list[int]]]:
        """Greedy completions of `prompts`: (text, token ids) each."""
        from vllm import SamplingParams

        outputs = self.llm.generate(
            list(prompts), SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False
        )
        return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outputs]

    def close(self) -> None:
        # "resource_tracker: There appear to be 2 leaked shared_memory objects" at exit is
        # vLLM's, not this package's, and it comes after an uninterrupted serialize too (seen
        # with vLLM 0.32 CPU): the multiprocessing executor's two shm_broadcast.MessageQueue
        # ring buffers (rpc_broadcast_mq made by the engine-core process, worker_response_mq by
        # the worker) are unlinked only in ShmRingBuffer.__del__, which does not run when
        # vLLM's shutdown terminates those processes. The package creates no shared memory;
        # the names live only in vLLM's processes. Python's resource tracker unlinks them as
        # it warns ("to clean up at shutdown").
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the engine may be half started
            logger.debug("engine shutdown failed", exc_info=True)
        del llm
        gc.collect()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


# -- LoRA adapters --------------------------------------------------------------------------


def tensorized_lora_request(
    model: str,
    adapter: str,
    *,
    lora_int_id: int | None = None,
    tensorizer_config: TensorizerConfig | dict | None = None,
):
    """A `vllm.lora.request.LoRARequest` for adapter `adapter` of serialized model `model`.

    The adapter (``<model>/lora/<adapter>``, local, S3 or HTTP(S)) is deserialized into CPU
    memory and handed to vLLM as a PEFT directory in RAM-backed storage (see `lora`).

    Args:
        model: the serialized model directory (as passed to ``LLM(...)``).
        adapter: the adapter's name (its ``--lora-path`` directory name when serialized).
        lora_int_id: vLLM's integer id for the adapter (default: derived from the name).
        tensorizer_config: how to read it (``encryption_keyfile``, S3 credentials...): this
            package's `TensorizerConfig`, vLLM's, or a dict of its fields.

    Example:
        >>> llm = LLM(model_dir, load_format="tensorizer", enable_lora=True)  # doctest: +SKIP
        >>> llm.generate(prompts, params,
        ...              lora_request=tensorized_lora_request(model_dir, "my-adapter"))
    """
    from vllm.lora.request import LoRARequest

    from .lora import adapter_uri, materialize_adapter

    if isinstance(tensorizer_config, dict):
        tensorizer_config = TensorizerConfig.from_extra_config(
            {"tensorizer_dir": model, **tensorizer_config}
        )
    elif tensorizer_config is not None:
        tensorizer_config = as_tensorizer_config(tensorizer_config)
    path = materialize_adapter(adapter_uri(model, adapter), tensorizer_config, name=adapter)
    if lora_int_id is None:
        lora_int_id = 1 + int(hashlib.sha256(adapter.encode()).hexdigest(), 16) % (2**31 - 2)
    return LoRARequest(lora_name=adapter, lora_int_id=lora_int_id, lora_path=path)


def _register_lora_resolver() -> None:
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    if "tensorize_vllm_model" in LoRAResolverRegistry.get_supported_resolvers():
        return

    class TensorizedLoRAResolver(LoRAResolver):
        """Serves ``lora/<name>`` of the tensorized model being served, by name.

        vLLM asks resolvers only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``.
        """

        async def resolve_lora(self, base_model_name: str, lora_name: str):
            from .lora import adapter_uri

            config = _served.get(base_model_name)
            model = (config.tensorizer_dir if config else None) or base_model_name
            options = config.stream_options() if config else None
            try:
                uri = adapter_uri(model, lora_name)
                if not storage.exists(storage.join(uri, "adapter_config.json"), options):
                    return None
            except Exception:  # noqa: BLE001 - not ours to resolve
                return None
            return tensorized_lora_request(model, lora_name, tensorizer_config=config)

    LoRAResolverRegistry.register_resolver("tensorize_vllm_model", TensorizedLoRAResolver())


def _memory() -> str:
    """This process's resident memory now and at its peak (Linux), for the load's log: the
    peak after vLLM's post-processing against the memory once the tensors are in shows what
    the post-processing adds."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        now, peak = (int(fields[k].split()[0]) * 1024 / 1e9 for k in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return "unknown"
    return f"resident {now:.2f} GB, peak {peak:.2f} GB"


# -- vLLM 0.32's tensorizer module: the names that need vLLM's internals -------------------


def init_tensorizer_model(tensorizer_config: Any, vllm_config: VllmConfig) -> nn.Module:
    """The model of `vllm_config`, built with its ``torch.empty`` parameters on the meta
    device (no memory, no initialisation), for `deserialize_tensorizer_model` to fill. As
    vLLM 0.32's function; vLLM's loader sets ``model_class`` on its config first, and the
    class is taken from `vllm_config` when the config (this package's) has none.
    """
    model_config = vllm_config.model_config
    device = target_device(vllm_config)
    model_class = getattr(tensorizer_config, "model_class", None)
    with set_default_torch_dtype(model_config.dtype), torch.device(device), meta_parameters(device):
        if model_class is None:
            return initialize_model(vllm_config=vllm_config, model_config=model_config)
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(vllm_config, check_compile=True):
            return model_class(vllm_config=vllm_config)


def deserialize_tensorizer_model(model: nn.Module, tensorizer_config: Any) -> None:
    """Fill `model`'s parameters and buffers from ``tensorizer_uri`` (one rank's file: the
    URI as given, already formatted), onto the device of the current platform, as vLLM
    0.32's function. `tensorizer_config` is this package's `TensorizerConfig`, vLLM's, or
    a dict of its fields.

    Raises:
        ValueError: `tensorizer_uri` is neither an existing local path nor an S3 or
            HTTP(S) URI (vLLM's check).
        ModelMismatchError: a tensor of the model is not in the file, or does not fit
            (where vLLM finds tensors left on the meta device).
        StorageError, FormatError, EncryptionError: as `streaming.open_tensors`.
    """
    from vllm.platforms import current_platform

    from .vllm_api import is_valid_deserialization_uri

    config = as_tensorizer_config(tensorizer_config)
    if not is_valid_deserialization_uri(config.tensorizer_uri):
        raise ConfigError(
            f"{config.tensorizer_uri} is not a valid tensorizer URI: it must be an existing "
            "local file, or have an s3, http or https scheme"
        )
    device = torch.device(current_platform.device_type)
    if device.type != "cpu":
        device = torch.device(device.type, torch.accelerator.current_device_index())
    with open_tensors(config.tensorizer_uri, device=device, config=config) as reader:
        stats = load_into_module(model, reader)
    logger.info(
        "Deserialized %.3f GB in %.2f s (%.2f GB/s) from %s",
        stats.bytes / 1e9,
        stats.seconds,
        stats.gb_per_s,
        stats.uri,
    )


def serialize_vllm_model(
    model: nn.Module, tensorizer_config: Any, model_config: ModelConfig
) -> nn.Module:
    """Write `model`'s parameters and buffers as they are now to ``tensorizer_uri``
    (formatted with this process's rank when it holds a rank template), encrypted with the
    key in ``encryption_keyfile`` when set, then its config and tokenizer files beside it
    (`serialize_extra_artifacts`). As vLLM 0.32's function, with this package's file record
    and all-or-nothing writes; returns `model`.

    On vLLM's CPU backend, call it before vLLM's weight post-processing, which empties the
    linear weights (`tensorize_vllm_model` does so).

    Raises:
        ConfigError: no ``tensorizer_uri``, or several ranks and no rank template.
        EncryptionError: the key file is missing or not a 32-byte key.
        StorageError: the file cannot be written (nothing is left at its name).
    """
    from . import __version__
    from .keys import read_key
    from .vllm_api import serialize_extra_artifacts

    config = as_tensorizer_config(tensorizer_config)
    layout = _distributed_layout()
    uri = layout_mod.rank_uri(config.tensorizer_uri or "", layout)
    key = read_key(config.encryption_keyfile, config) if config.encryption_keyfile else None
    tensors = [(name, p.detach(), False) for name, p in model.named_parameters()]
    tensors += [(name, b.detach(), True) for name, b in model.named_buffers()]
    record = FileRecord(
        architecture=type(model).__name__,
        dtype=_dtype_name(model_config.dtype),
        tensor_parallel_size=layout.tensor_parallel_size,
        pipeline_parallel_size=layout.pipeline_parallel_size,
        rank=layout.rank,
        producer=f"tensorize_vllm_model {__version__}, vllm {vllm_version()}",
    )
    write_tensors(
        uri,
        tensors,
        record=record,
        key=key,
        serialization_kwargs=config.serialization_kwargs,
        options=config.stream_options(),
    ).commit()
    serialize_extra_artifacts(
        config._construct_tensorizer_args(),
        model_config.served_model_name,
        revision=model_config.revision,
    )
    logger.info("Serialized the model to %s", storage.redact(uri))
    return model


def _distributed_layout() -> ParallelLayout:
    """This process's place in vLLM's model-parallel groups (one rank when they are not
    set up, as outside an engine)."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return ParallelLayout()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pp_group().world_size
    return ParallelLayout(
        tp,
        pp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pp_group().rank_in_group,
    )
