"""The model loaders vLLM is given.

* `TensorizerLoader` (``load_format="tensorizer"``): builds the model on the meta device,
  streams the tensors onto the worker's device (``cuda:N``, ``cpu``; the file a rank reads
  is `plan.resolve_read`'s answer), then runs vLLM's weight post-processing.
* `CaptureLoader` (serializing only): vLLM's default loader, keeping the weights as they are
  *before* post-processing (the CPU backend repacks linear weights and drops the
  originals), for the worker extension to write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import BaseModelLoader, DefaultModelLoader
from vllm.model_executor.model_loader.utils import (
    initialize_model,
    process_weights_after_loading,
)
from vllm.utils.torch_utils import set_default_torch_dtype

from ... import storage
from ...config import TensorizerConfig
from ...config.plan import ReadPlan, check_shared_file, resolve_read
from ...convert.guard import check_loaded

# imported with the loader, as the readers are, not within a load's timed window
from ...convert.loading import ConvertedFile, checkpoint_tensors, collections_paused
from ...convert.regions import CopyWatch
from ...convert.runs import RunReads, check_runs, plan_runs
from ...core.errors import ConfigError, ModelMismatchError
from ...core.progress import progress
from ...core.redaction import scrubbing
from ...format.record import ParallelLayout
from ...read import prefetch
from ...read.base import LoadStats
from ...read.modules import load_into_module, meta_parameters
from ...read.parts import PartsRead
from ...read.reader import default_num_readers, open_tensors
from .compiled import stage_for_load
from .meta_pass import run_meta_pass
from .runtime import (
    STATE,
    CapturedWeights,
    current_layout,
    distributed_layout,
    expert_parallel,
    model_dtype,
    readers_on_every_core,
    reload_config,
    target_device,
    torch_dtype_name,
)

__all__ = ["TensorizerLoader", "CaptureLoader", "memory_text"]

# Under vLLM's namespace, so that vLLM's logging configuration shows these lines.
logger = scrubbing(init_logger(f"vllm.{__name__}"))


class TensorizerLoader(BaseModelLoader):
    """Loads ``load_format="tensorizer"`` models with this package's readers (`read`)."""

    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self.tensorizer_config = TensorizerConfig.from_extra_config(
            load_config.model_loader_extra_config
        )
        self._started: str | None = None  # the model path `load_model` was given

    def read_plan(
        self, vllm_config: VllmConfig | None, config: TensorizerConfig | None = None
    ) -> ReadPlan:
        """Which file this worker reads, and how (`plan.resolve_read`), by `config` (this
        loader's settings when None); without a vLLM config, by this process's place in
        vLLM's parallel groups."""
        layout = current_layout(vllm_config) if vllm_config else distributed_layout()
        return resolve_read(config or self.tensorizer_config, layout)

    def rank_uri(self, vllm_config: VllmConfig) -> str:
        """The file this worker reads: its rank's file, or the one file every rank shares
        (`_open_checked` checks that it may be shared)."""
        return self.read_plan(vllm_config).uri

    def _open_checked(
        self, vllm_config: VllmConfig | None, device: torch.device | str, config=None
    ):
        """Open this worker's file (by `config`, this loader's settings when None) and
        check that it fits the layout: (uri, source, reader), `source` being what the
        reader reads: the local copy of `uri` made during the engine's start-up
        (`prefetch`) if there is one, else `uri`."""
        config = config or self.tensorizer_config
        plan = self.read_plan(vllm_config, config)
        source = prefetch.local_copy(plan.uri) or plan.uri  # copied during the start-up
        reader = open_tensors(source, device=device, config=config)
        try:
            if plan.shared:
                check_shared_file(
                    plan.uri,
                    plan.layout,
                    vllm_tensorized=reader.vllm_tensorized,
                    record=reader.record,
                )
            if reader.record is not None and not reader.checkpoint_form:
                reader.record.check_written_for(plan.layout, source=plan.uri)
                if vllm_config is not None:  # get_all_weights reads every expert
                    reader.record.check_expert_parallel(
                        expert_parallel(vllm_config),
                        (e.name for e in reader.entries()),
                        source=plan.uri,
                    )
        except BaseException:
            reader.close()
            raise
        return plan.uri, source, reader

    def download_model(self, model_config: ModelConfig) -> None:
        uri = resolve_read(self.tensorizer_config, ParallelLayout()).uri  # rank 0's file
        if storage.local_path(uri) is not None and not storage.exists(uri):
            raise ConfigError(f"no such tensors file: {uri}")

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        device, self._started = target_device(vllm_config), model_config.model
        # No garbage collection from the open to the last tensor in: a full collection of
        # the engine's process (0.4-0.5 s here) landed in a converted MoE load's time.
        with readers_on_every_core(device), collections_paused():
            uri, source, reader = self._open_checked(vllm_config, device)
            copied = " (its local copy, made during the start-up)" if source != uri else ""
            logger.info("Loading tensors from %s%s onto %s", uri, copied, device)
            with reader, set_default_torch_dtype(model_dtype(model_config)):
                model = self._build(reader, vllm_config, model_config, prefix, device)
                rank0 = current_layout(vllm_config).rank == 0
                with progress(
                    "Deserializing", reader.total_tensor_bytes, logger=logger, enabled=rank0
                ) as reader.on_bytes:
                    stats = self._fill(model, reader, source, device)
        STATE.last_load = stats
        prefetch.release(uri)
        # Read now, put in place as vLLM compiles: the compile cache shipped with the model.
        stage_for_load(vllm_config, uri, self.tensorizer_config.options)
        logger.info(
            "Deserialized %.3f GB in %.2f s (%.2f GB/s) from %s (%sworker memory: %s)",
            stats.bytes / 1e9,
            stats.seconds,
            stats.gb_per_s,
            uri,
            f"{stats.read_times}; " if stats.read_times else "",
            memory_text(),
        )
        gc.collect()
        process_weights_after_loading(model, model_config, device)
        logger.info("vLLM's weight post-processing done (worker memory: %s)", memory_text())
        return model.eval()

    @staticmethod
    def _build(
        reader: Any,
        vllm_config: VllmConfig,
        model_config: ModelConfig,
        prefix: str,
        device: torch.device,
    ) -> nn.Module:
        """vLLM's model, its parameters on meta for a vLLM-tensorized file; the building
        time is left out of the reader's figures."""
        with reader.untimed(), torch.device(device), contextlib.ExitStack() as stack:
            if reader.vllm_tensorized:
                stack.enter_context(meta_parameters(device))
            model = initialize_model(
                vllm_config=vllm_config, model_config=model_config, prefix=prefix
            )
        return model

    def _fill(self, model: nn.Module, reader: Any, uri: str, device: torch.device) -> LoadStats:
        """Fill `model` from `reader`, by the file's kind; a converted file's parts are
        read from `uri`, the file `reader` opened (a prefetched local copy, not the remote
        file it copies)."""
        if reader.vllm_tensorized:
            return load_into_module(model, reader)
        if reader.checkpoint_form:
            with collections_paused():
                return self._load_converted(model, reader, uri, device)
        return self._load_hf_weights(model, reader)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Reload weights into an already built model (vLLM's in-place reload)."""
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        device = next(model.parameters()).device
        config = reload_config(self.tensorizer_config, model_config, self._started)
        _, source, reader = self._open_checked(vllm_config, device, config)
        with reader:
            self._fill(model, reader, source, device)

    def get_all_weights(
        self, model_config: ModelConfig, model: nn.Module
    ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """Every tensor of this worker's file, for vLLM 0.34's in-place reload and expert
        (EPLB) reload, which feed them to ``model.load_weights``.

        A converted file or a Hugging Face model's file gives checkpoint names and shapes
        (column tiles put back; buffers such as ``rotary_emb.inv_freq`` left out), every
        tensor whole. A vLLM-tensorized file (``serialize``) gives vLLM's parameter names
        and this rank's shards: what vLLM's reload with ``is_checkpoint_format=False``
        copies straight into the parameters. The tensors are on the CPU, freshly allocated.
        Read from `model_config`'s model when it names another (`runtime.reload_config`).
        """
        config = reload_config(self.tensorizer_config, model_config, self._started)
        _, _, reader = self._open_checked(None, "cpu", config)
        with reader:
            if reader.checkpoint_form:
                yield from checkpoint_tensors(reader)
                return
            kinds = reader.tensor_types()
            for name, tensor in reader.items():
                if reader.vllm_tensorized or kinds.get(name) != "BUFFER":
                    yield name, tensor

    def _load_converted(
        self, model: nn.Module, reader: Any, uri: str, device: torch.device
    ) -> LoadStats:
        """A converted file (checkpoint form): vLLM's ``load_weights`` is first run on meta
        tensors to learn which bytes of each tensor this rank copies (`convert.regions`),
        then fed tensors with only those bytes read (`convert.loading`)."""
        threads = self.tensorizer_config.num_readers or default_num_readers(uri, "cpu")
        opened = reader.stats(tensors=0, nbytes=0).seconds  # the index read and checked
        clock = [time.perf_counter()]  # the phases' ends: the breakdown logged below
        converted = ConvertedFile(reader, uri, self.tensorizer_config, threads)
        _check_pieces(model, converted.entries, reader.uri)
        watch = CopyWatch()
        clock.append(time.perf_counter())
        with _naming_tensor(reader, watch), watch:
            loaded, runs = run_meta_pass(_vllm_model(model), converted, watch)
        clock.append(time.perf_counter())
        _check_all_loaded(model, loaded, reader)
        converted.owners = {
            t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
        }
        reads = plan_runs(converted, runs, watch.needs)  # the rest spelled out into needs
        parts = converted.parts(watch.needs)
        STATE.last_parts[:] = [
            (p.name, p.entry.data_offset + p.span[0], p.entry.data_offset + p.span[1])
            for p in parts
        ] + reads.ranges()
        read = PartsRead()
        clock.append(time.perf_counter())
        with _naming_tensor(reader, watch):
            _vllm_model(model).load_weights(converted.tensors(parts, read, reads))
        clock.append(time.perf_counter())
        _check_against_file(model, watch, converted, reads)
        clock.append(time.perf_counter())
        index, meta, plan, reading, guard = (b - a for a, b in zip(clock, clock[1:]))
        logger.info(  # where a converted load's time goes (benchmarks/moe.py reads it)
            "Meta pass over %d tensors took %.2f s (%d through vLLM's loaders; before it: "
            "names and pieces %.2f s; after: read plan %.2f s, reads %.2f s, guard %.2f s; %d "
            "derived experts' tensors read in runs; the file's index opened in %.2f s)",
            *(len(converted.entries), meta, watch.inputs, index, plan, reading, guard),
            *(len(reads.names), opened),
        )
        return reader.stats(tensors=len(parts) + len(reads.names), nbytes=read.bytes)

    @staticmethod
    def _load_hf_weights(model: nn.Module, reader: Any) -> LoadStats:
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

        _vllm_model(model).load_weights(weights())
        return reader.stats(tensors=count, nbytes=nbytes)


def _vllm_model(model: nn.Module) -> Any:
    """`model` as vLLM's model interface (``load_weights``), which `nn.Module` does not
    declare."""
    return model


@contextlib.contextmanager
def _naming_tensor(reader: Any, watch: Any) -> Iterator[None]:
    """vLLM's ``load_weights`` fails with a bare KeyError, ValueError or AssertionError on
    a tensor its model does not have, or of another shape than its parameter: name the
    tensor, its shape in the file, the file and the architecture instead."""
    try:
        yield
    except (KeyError, ValueError, AssertionError, AttributeError) as e:
        need = watch.current
        tensor = f"{need.name} (shape {list(need.shape)} in the file)" if need else "?"
        architecture = reader.record.architecture if reader.record else "?"
        raise ModelMismatchError(
            f"vLLM cannot load the checkpoint in {reader.uri} for this model: tensor "
            f"{tensor} was refused by vLLM's {architecture} ({type(e).__name__}: {e})"
        ) from None


def _check_pieces(model: nn.Module, names: Iterable[str], source: str) -> None:
    """Refuse checkpoint tensors `names` that hold only part of a weight `model` merges
    (`convert.pieces`: q/k/v, gate/up, a layer's experts), naming the missing one; vLLM
    0.32 would load the rest silently, 0.34 refuses it in its default loader only."""
    from ...convert.pieces import check_pieces

    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    packed = getattr(model, "packed_modules_mapping", None)
    check_pieces(names, packed, to_dict() if to_dict is not None else {}, source=source)


def _check_against_file(
    model: nn.Module, watch: CopyWatch, converted: ConvertedFile, runs: RunReads
) -> None:
    """Sampled elements of every parameter against the file's (`convert.guard`, and
    `convert.runs` for runs of derived experts); refuses the load naming a parameter that
    does not hold what vLLM's default loader puts there."""
    read_element = converted.element_reader()
    try:
        compared = check_loaded(watch.results(), model, read_element, converted.tiles)
        compared += check_runs(runs, model, read_element)
    finally:
        converted.close_element_reader()
    logger.debug("guard: %d sampled elements match the file", compared)


def _check_all_loaded(model: nn.Module, loaded: Any, reader: Any) -> None:
    """As vLLM's default loader: every parameter must have been filled from the file."""
    if loaded is None:
        return
    missing = sorted(set(dict(model.named_parameters())) - set(loaded))
    if missing:
        raise ModelMismatchError(
            f"{reader.uri} does not hold every weight vLLM's "
            f"{type(model).__name__} needs; missing: {', '.join(missing)}"
        )


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
        if os.path.isdir(model_config.model):  # a Hub id's files: vLLM 0.34 checks them
            from ...convert.checkpoint import open_checkpoint

            names = (name for name, _ in open_checkpoint(model_config.model).shapes())
            _check_pieces(model, names, model_config.model)
        super().load_weights(model, model_config)
        tensors = [(name, p.detach(), False) for name, p in model.named_parameters()]
        tensors += [(name, b.detach(), True) for name, b in model.named_buffers()]
        STATE.captured = CapturedWeights(
            tensors=tensors,
            architecture=type(model).__name__,
            dtype=torch_dtype_name(model_config.dtype),
        )


def memory_text() -> str:
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
